//! Arbitrary bytes as a sightline.v1 stream: a sequence of length-prefixed batches sharing one
//! string dictionary, each through the whole pipeline.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sightline_collector::pipeline::native::Dictionary;
use sightline_proto::v1::Batch;

fuzz_target!(|data: &[u8]| {
    let mut dictionary = Dictionary::default();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (message, next) = tail.split_at((len as usize * 16).min(tail.len()));
        rest = next;
        let Ok(batch) = Batch::decode(message) else { continue };
        // A broken stream ends the stream: the agent starts a new one with a new dictionary.
        if common::pipeline()
            .ingest_native("fuzz", batch, &mut dictionary)
            .is_err()
        {
            dictionary = Dictionary::default();
        }
    }
});
