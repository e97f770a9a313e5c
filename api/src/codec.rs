//! The protobuf codec of both services, with small starting buffers.
//!
//! tonic's default gives every stream an 8 KiB encode buffer and an 8 KiB decode buffer. A
//! control plane holds one stream per proxy, and after the first sync its messages are a few
//! hundred bytes (one cluster) or acknowledgements; at 5 000 proxies the defaults alone were
//! ~80 MiB. Buffers here start at 512 bytes and grow for a larger message as before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Starting size of a stream's encode and decode buffers.
pub const BUFFER_SIZE: usize = 512;
/// tonic's default: a stream of many small messages is flushed at least every 32 KiB.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers; named by the generated code.
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}

/// `message` as one gRPC length-prefixed frame (not compressed), in a buffer of exactly its size.
///
/// For a server that streams its responses without tonic's encoder, whose per-stream buffer
/// keeps the capacity of the largest batch it ever encoded.
pub fn grpc_frame(message: &impl prost::Message) -> tonic::codegen::Bytes {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut buf).expect("a Vec grows as needed");
    buf.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1alpha1 as pb;

    #[test]
    fn a_frame_is_flag_length_and_message_in_an_exact_buffer() {
        let msg = pb::DeltaResponse {
            nonce: "7".into(),
            system_version: "v1".into(),
            removed: vec!["web".into()],
            ..Default::default()
        };
        let frame = grpc_frame(&msg);
        let len = prost::Message::encoded_len(&msg);
        assert_eq!(frame.len(), 5 + len);
        assert_eq!(frame[0], 0, "not compressed");
        assert_eq!(u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize, len);
        let back: pb::DeltaResponse = prost::Message::decode(&frame[5..]).unwrap();
        assert_eq!(back, msg);
    }
}
