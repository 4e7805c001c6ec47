//! Requests that are not valid protobuf, sent as raw bytes the way a hostile or broken client would.

use std::sync::Arc;

use allowance::clock::ManualClock;
use allowance::storage::memory::MemoryStore;
use tonic::Code;

use crate::helpers::raw::{self, field, varint_field};
use crate::helpers::{TestServer, epoch};

const RESERVE: &str = "/allowance.v1.SpendingLimits/ReserveSpending";
const COMMIT: &str = "/allowance.v1.SpendingLimits/Commit";
const GET_LIMITS: &str = "/allowance.v1.SpendingLimits/GetLimits";
const CREATE_CALLER: &str = "/allowance.v1.AdminService/CreateCaller";

/// Not UTF-8: a lone continuation byte and two bytes that never occur in UTF-8.
const NOT_UTF8: &[u8] = &[0x80, 0xfe, 0xff];

#[tokio::test]
async fn a_string_that_is_not_utf8_is_invalid_argument_naming_the_field() {
    let s = TestServer::start(MemoryStore::new(), Arc::new(ManualClock::new(epoch()))).await;
    let ok_reserve = |key: &[u8], tx: &[u8], unit: &[u8]| {
        [field(1, key), field(2, tx), varint_field(3, 10), field(4, unit)].concat()
    };
    let metadata = |k: &[u8], v: &[u8]| {
        [ok_reserve(b"k", b"t-meta", b"usd"), field(7, &[field(1, k), field(2, v)].concat())].concat()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (RESERVE, ok_reserve(NOT_UTF8, b"t1", b"usd"), "key_id"),
        (RESERVE, ok_reserve(b"k", NOT_UTF8, b"usd"), "transaction_id"),
        (RESERVE, ok_reserve(b"k", b"t1", NOT_UTF8), "unit"),
        (RESERVE, metadata(NOT_UTF8, b"v"), "metadata"),
        (RESERVE, metadata(b"order", NOT_UTF8), "metadata"),
        (RESERVE, [ok_reserve(b"k", b"t1", b"usd"), field(8, NOT_UTF8)].concat(), "additional_key_ids"),
        (COMMIT, field(1, NOT_UTF8), "transaction_id"),
        (GET_LIMITS, field(1, NOT_UTF8), "key_id"),
        (CREATE_CALLER, field(1, NOT_UTF8), "name"),
    ];
    for (path, body, name) in cases {
        let status = raw::call(s.addr, path, body).await.expect_err(path);
        assert_eq!(status.code(), Code::InvalidArgument, "{path} with {name} not UTF-8: {status:?}");
        assert!(
            status.message().starts_with("the request could not be decoded: "),
            "{path}: {}",
            status.message()
        );
        assert!(status.message().contains(name), "{path}: the message names {name}: {}", status.message());
    }

    // Bytes that are not protobuf at all: a truncated length, an unknown wire type.
    for body in [vec![0x0a, 0x05, b'k'], vec![0x0f], vec![0x08, 0xff, 0xff]] {
        let status = raw::call(s.addr, RESERVE, body.clone()).await.expect_err("garbage");
        assert_eq!(status.code(), Code::InvalidArgument, "{body:?}: {status:?}");
    }

    // The same request with valid strings goes through: the raw client itself is sound.
    let reply = raw::call(s.addr, RESERVE, ok_reserve(b"k", b"t1", b"usd")).await.unwrap();
    let reply: allowance::grpc::pb::ReserveSpendingResponse = prost::Message::decode(&reply[..]).unwrap();
    assert!(reply.allowed);
}
