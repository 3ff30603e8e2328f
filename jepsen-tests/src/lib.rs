//! courier-jepsen: real node processes under faults, a recorded history, and a checker that proves
//! nothing acknowledged was lost, duplicated or reordered. (Built in issue #9; see
//! ../shared/TESTING.md tier 2.)

pub mod checker;
pub mod history;
