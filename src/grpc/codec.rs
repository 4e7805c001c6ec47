//! The codec of our servers: tonic's prost codec, except that a request that cannot be decoded is the
//! client's fault (INVALID_ARGUMENT), not INTERNAL — an alert on INTERNAL should mean a bug of ours.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// Encodes responses as tonic's [`ProstCodec`] does; decodes requests with [`RequestDecoder`].
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(std::marker::PhantomData)
    }
}

/// Decodes a request; what is not valid protobuf for its type is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U>(std::marker::PhantomData<U>);

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| undecodable(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The answer to a request that is not valid protobuf. prost's text names the message and field and what
/// was wrong (`ReserveSpendingRequest.key_id: invalid string value: data is not UTF-8 encoded`): nothing of
/// ours but the public contract.
pub fn undecodable(e: &prost::DecodeError) -> Status {
    let text = e.to_string();
    let detail = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(&text);
    Status::invalid_argument(format!("the request could not be decoded: {detail}"))
}
