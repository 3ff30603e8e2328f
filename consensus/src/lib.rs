//! courier's consensus layer: openraft over the storage crate, one raft group per shard plus a
//! metadata group, with the raft transport over gRPC. (Built in issue #5.)
