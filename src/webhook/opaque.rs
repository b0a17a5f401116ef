//! What a send puts in `biz_opaque_callback_data`, which Meta echoes in every status of the
//! message: the job id, then [`SHARD_MARK`], then the shard that sent it, so that the message's
//! statuses can go back to that shard in batches (see [`super::batch`]).

/// Between the job id and the shard. A job id is printable ASCII (0x20–0x7e), so the unit
/// separator can never be part of one.
pub const SHARD_MARK: char = '\u{1f}';

/// The `biz_opaque_callback_data` of a send: the job id, then the sending shard.
pub fn callback_data(job_id: &str, shard: u16) -> String {
    format!("{job_id}{SHARD_MARK}{shard}")
}

/// Reads `biz_opaque_callback_data` back: the job id and, when the send named one, the shard.
/// An older build's (the bare job id) has no shard.
pub fn read_callback_data(data: &str) -> (&str, Option<u16>) {
    match data.rsplit_once(SHARD_MARK) {
        Some((id, shard)) => (id, shard.parse().ok()),
        None => (data, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_data_carries_the_job_id_and_the_shard() {
        let data = callback_data("job 1|x", 7);
        assert_eq!(read_callback_data(&data), ("job 1|x", Some(7)));
        // An older build's send: the bare id.
        assert_eq!(read_callback_data("job-1"), ("job-1", None));
        // A mangled shard is no shard; the id is still read.
        assert_eq!(read_callback_data("job-1\u{1f}x"), ("job-1", None));
    }
}
