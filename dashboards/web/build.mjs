// Bundles the dashboard into dist/ (JS and CSS from npm packages included: no CDN, works
// offline). The collector serves dist/ at :8480/.
import { build } from 'esbuild';
import { copyFile, mkdir, rm } from 'node:fs/promises';

await rm('dist', { recursive: true, force: true });
await mkdir('dist', { recursive: true });
await build({
  entryPoints: ['src/main.js'],
  bundle: true,
  minify: true,
  sourcemap: true,
  format: 'esm',
  // Views load on first use (the graph library only with the topology).
  splitting: true,
  entryNames: '[name]',
  chunkNames: 'chunks/[name]-[hash]',
  target: 'es2022',
  outdir: 'dist',
  logLevel: 'warning',
});
await copyFile('index.html', 'dist/index.html');
console.log('built dashboards/web/dist');
