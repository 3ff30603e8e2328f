//! Message bodies. A body starts with the send's client id (how the checker matches a delivery to
//! its send). One send in [`LARGE_ONE_IN`] is large: after the client id come the body's length
//! and a filler, up to `MESSAGE_BODY_BYTES_MAX` in all, so that under faults the byte limits of
//! appends, forwarded batches and log pages are crossed, not only in the integration tests. The
//! filler is a pattern of each byte's position, so a receiver checks it byte for byte.
//!
//! ```text
//!   small:  "p-c"
//!   large:  "p-c" '\n' "<total length>" '\n' filler[i] = i mod 251 for the body's position i
//! ```

use courier_proto::limits::MESSAGE_BODY_BYTES_MAX;
use rand::Rng;

/// One send in this many carries a large body.
pub const LARGE_ONE_IN: u32 = 16;
/// The smallest large body, in bytes (the largest is `MESSAGE_BODY_BYTES_MAX`).
pub const LARGE_BODY_BYTES_MIN: usize = 16 * 1024;
/// Ends the client id, then the length, in a large body.
const SEPARATOR: u8 = b'\n';
/// What a body that is not intact reads as, after its client id: a client id no send used, so
/// the checker reports the delivery as unexpected.
pub const CORRUPT: &str = " (corrupt body)";

/// The body of a send with `client_id`: large in one send in [`LARGE_ONE_IN`].
pub fn body(client_id: &str, rng: &mut impl Rng) -> Vec<u8> {
    let mut body = client_id.as_bytes().to_vec();
    if rng.random_ratio(1, LARGE_ONE_IN) {
        let len = rng.random_range(LARGE_BODY_BYTES_MIN..=MESSAGE_BODY_BYTES_MAX);
        body.push(SEPARATOR);
        body.extend_from_slice(len.to_string().as_bytes());
        body.push(SEPARATOR);
        let start = body.len();
        body.extend((start..len).map(filler_byte));
    }
    body
}

/// The client id a delivered body carries, with [`CORRUPT`] appended when a large body's length
/// or filler is not what was sent.
pub fn client_id_of(body: &[u8]) -> String {
    let mut parts = body.splitn(3, |b| *b == SEPARATOR);
    let id = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (Some(len), Some(filler)) = (parts.next(), parts.next()) else {
        return id;
    };
    let stated: Option<usize> = std::str::from_utf8(len).ok().and_then(|l| l.parse().ok());
    let start = body.len().saturating_sub(filler.len());
    let intact = stated == Some(body.len())
        && filler
            .iter()
            .enumerate()
            .all(|(i, b)| *b == filler_byte(start.saturating_add(i)));
    if intact { id } else { format!("{id}{CORRUPT}") }
}

fn filler_byte(position: usize) -> u8 {
    u8::try_from(position % 251).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn a_body_gives_back_its_client_id_and_some_are_large() {
        let mut rng = StdRng::seed_from_u64(7);
        let bodies: Vec<Vec<u8>> = (0..200)
            .map(|n| body(&format!("3-{n}"), &mut rng))
            .collect();
        for (n, body) in bodies.iter().enumerate() {
            assert_eq!(client_id_of(body), format!("3-{n}"));
            assert!(body.len() <= MESSAGE_BODY_BYTES_MAX);
        }
        let large = bodies
            .iter()
            .filter(|b| b.len() >= LARGE_BODY_BYTES_MIN)
            .count();
        assert!((3..=30).contains(&large), "{large} large bodies of 200");
    }

    #[test]
    fn a_changed_or_cut_large_body_reads_as_corrupt() {
        let mut rng = StdRng::seed_from_u64(1);
        let large = (0..100)
            .map(|n| body(&format!("1-{n}"), &mut rng))
            .find(|b| b.len() >= LARGE_BODY_BYTES_MIN)
            .expect("one large body in 100");
        let id = client_id_of(&large);
        let mut changed = large.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_eq!(client_id_of(&changed), format!("{id}{CORRUPT}"));
        let cut = &large[..large.len() - 1];
        assert_eq!(client_id_of(cut), format!("{id}{CORRUPT}"));
    }
}
