//! A disk in memory for the deterministic simulation (`sim/`): it keeps what was **written**
//! apart from what was **synced**, so a simulated power loss loses exactly the writes no fsync
//! covered, as RocksDB's WAL would.
//!
//! ```text
//!   write(batch, sync = false) ──▶ visible ◀── reads          pending: [b1, b2, b3]
//!   write(batch, sync = true)  ──▶ visible, and pending + batch ──▶ durable (one fsync of the WAL)
//!   crash(keep)                ──▶ durable += the first `keep` pending batches (a torn WAL tail
//!                                  recovers a prefix, never a hole); visible = durable
//! ```
//!
//! Every [`Db`](crate::Db) opened on a disk belongs to one incarnation: after [`MemDisk::crash`]
//! the old handle fails every call (the node it served is gone), and a new `Db` opened on the
//! same disk sees what survived. [`MemDisk::fail_syncs`] makes fsync fail, as a dying disk does;
//! the write that asked for it is not applied and the handle stays failed until the next crash
//! (RocksDB likewise stops accepting writes after a WAL sync error).
//! [`MemDisk::set_install_latency`] makes a snapshot install take simulated time, as a real one
//! takes time writing the shard: without it an install finished within one scheduler step, and a
//! crash could never fall between openraft handing it over and its end. While one runs,
//! [`MemDisk::installing`] says so, and the simulation's nemesis may cut the power inside it.
//!
//! Production never uses this: a node opens RocksDB ([`Db::open`](crate::Db::open)).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::cf::Cf;
use crate::error::{Result, StorageError};
use crate::kv::Pair;

/// One write of a batch.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Delete `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
    /// Put or (with `None`) delete one key.
    Set(Cf, Vec<u8>, Option<Vec<u8>>),
}

type Families = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

fn apply(families: &mut Families, batch: &[Op]) {
    for op in batch {
        match op {
            Op::DeleteRange(cf, from, to) => {
                if let Some(family) = families.get_mut(cf) {
                    let doomed: Vec<Vec<u8>> = family
                        .range::<[u8], _>((Bound::Included(&from[..]), Bound::Excluded(&to[..])))
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in doomed {
                        family.remove(&key);
                    }
                }
            }
            Op::Set(cf, key, Some(value)) => {
                families
                    .entry(*cf)
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Op::Set(cf, key, None) => {
                if let Some(family) = families.get_mut(cf) {
                    family.remove(key);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Disk {
    visible: Families,
    durable: Families,
    /// Batches written since the last sync, oldest first.
    pending: Vec<Vec<Op>>,
    /// Bumped by every crash; a handle of an older incarnation is dead.
    incarnation: u64,
    /// Incarnation whose handle met a failed fsync (it fails from then on).
    failed: Option<u64>,
    fail_syncs: bool,
    syncs: u64,
    install_latency: Duration,
    /// A snapshot install is under way (begun, not yet ended, no crash since).
    installing: bool,
    installs_begun: u64,
}

/// What a crash did to the unsynced writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashLoss {
    /// Unsynced batches that survived (a prefix of them).
    pub kept: usize,
    /// Unsynced batches lost.
    pub lost: usize,
}

/// A simulated disk; share it (`Arc`) between the incarnations of one simulated node.
#[derive(Debug, Default)]
pub struct MemDisk {
    disk: Mutex<Disk>,
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The incarnation a newly opened handle belongs to.
    pub(crate) fn attach(&self) -> u64 {
        self.lock().incarnation
    }

    /// Power loss: of the batches written since the last sync, `keep(pending)` (at most all of
    /// them) survive as a prefix; everything later is gone. Handles opened before are dead.
    pub fn crash(&self, keep: impl FnOnce(usize) -> usize) -> CrashLoss {
        let mut disk = self.lock();
        let pending = std::mem::take(&mut disk.pending);
        let kept = keep(pending.len()).min(pending.len());
        for batch in &pending[..kept] {
            apply(&mut disk.durable, batch);
        }
        disk.visible = disk.durable.clone();
        disk.incarnation = disk.incarnation.wrapping_add(1);
        disk.failed = None;
        disk.installing = false;
        CrashLoss {
            kept,
            lost: pending.len().saturating_sub(kept),
        }
    }

    /// From now on (until turned off), every fsync fails.
    pub fn fail_syncs(&self, fail: bool) {
        self.lock().fail_syncs = fail;
    }

    /// From now on, a snapshot install on this disk waits `latency` (simulated time) before it
    /// writes, as a real install spends writing the shard (`Db::simulated_install_latency`).
    pub fn set_install_latency(&self, latency: Duration) {
        self.lock().install_latency = latency;
    }

    /// A snapshot install begins: marks it under way and answers how long it is to take.
    pub(crate) fn begin_install(&self) -> Duration {
        let mut disk = self.lock();
        disk.installing = true;
        disk.installs_begun = disk.installs_begun.wrapping_add(1);
        disk.install_latency
    }

    /// The install begun last has written what it installs.
    pub(crate) fn end_install(&self) {
        self.lock().installing = false;
    }

    /// Whether a snapshot install is under way, and how many began so far (so that a watcher
    /// tells one install from the next).
    pub fn installing(&self) -> (bool, u64) {
        let disk = self.lock();
        (disk.installing, disk.installs_begun)
    }

    /// Successful fsyncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    fn live(disk: &Disk, incarnation: u64, op: &'static str) -> Result<()> {
        if disk.incarnation != incarnation {
            return Err(StorageError::Disk {
                op,
                reason: "the node crashed; this handle is from before".to_owned(),
            });
        }
        if disk.failed == Some(incarnation) {
            return Err(StorageError::Disk {
                op,
                reason: "an earlier fsync failed; the disk takes no more writes".to_owned(),
            });
        }
        Ok(())
    }

    pub(crate) fn write(&self, incarnation: u64, batch: Vec<Op>, sync: bool) -> Result<()> {
        let mut disk = self.lock();
        Self::live(&disk, incarnation, "write")?;
        if sync {
            Self::check_fsync(&mut disk, incarnation)?;
        }
        apply(&mut disk.visible, &batch);
        disk.pending.push(batch);
        if sync {
            Self::sync_locked(&mut disk);
        }
        Ok(())
    }

    pub(crate) fn sync(&self, incarnation: u64) -> Result<()> {
        let mut disk = self.lock();
        Self::live(&disk, incarnation, "fsync")?;
        Self::check_fsync(&mut disk, incarnation)?;
        Self::sync_locked(&mut disk);
        Ok(())
    }

    /// An fsync while [`MemDisk::fail_syncs`] is on fails, and the handle with it.
    fn check_fsync(disk: &mut Disk, incarnation: u64) -> Result<()> {
        if !disk.fail_syncs {
            return Ok(());
        }
        disk.failed = Some(incarnation);
        Err(StorageError::Disk {
            op: "fsync",
            reason: "input/output error (injected)".to_owned(),
        })
    }

    fn sync_locked(disk: &mut Disk) {
        let pending = std::mem::take(&mut disk.pending);
        for batch in &pending {
            apply(&mut disk.durable, batch);
        }
        disk.syncs = disk.syncs.wrapping_add(1);
    }

    pub(crate) fn get(&self, incarnation: u64, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let disk = self.lock();
        Self::live(&disk, incarnation, "get")?;
        Ok(disk.visible.get(&cf).and_then(|f| f.get(key)).cloned())
    }

    pub(crate) fn scan(
        &self,
        incarnation: u64,
        cf: Cf,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
        last: bool,
    ) -> Result<Vec<Pair>> {
        let disk = self.lock();
        Self::live(&disk, incarnation, "iterate")?;
        let Some(family) = disk.visible.get(&cf) else {
            return Ok(Vec::new());
        };
        let mut pairs = family.range::<[u8], _>(range);
        let clone = |(key, value): (&Vec<u8>, &Vec<u8>)| (key.clone(), value.clone());
        Ok(if last {
            pairs.next_back().map(clone).into_iter().collect()
        } else {
            pairs.take(limit).map(clone).collect()
        })
    }

    /// Every visible pair, family by family (a checkpoint copies them).
    pub(crate) fn visible(&self, incarnation: u64) -> Result<Vec<(Cf, Vec<Pair>)>> {
        let disk = self.lock();
        Self::live(&disk, incarnation, "checkpoint")?;
        Ok(disk
            .visible
            .iter()
            .map(|(cf, family)| {
                let pairs = family
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                (*cf, pairs)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Vec<Op> {
        vec![Op::Set(
            Cf::Log,
            key.as_bytes().to_vec(),
            Some(value.as_bytes().to_vec()),
        )]
    }

    fn read(disk: &MemDisk, key: &str) -> Option<Vec<u8>> {
        disk.get(disk.attach(), Cf::Log, key.as_bytes()).unwrap()
    }

    #[test]
    fn a_crash_keeps_synced_writes_and_a_prefix_of_the_rest() {
        let disk = MemDisk::new();
        let me = disk.attach();
        disk.write(me, put("a", "1"), true).unwrap();
        disk.write(me, put("b", "2"), false).unwrap();
        disk.write(me, put("c", "3"), false).unwrap();
        disk.write(me, put("d", "4"), false).unwrap();
        assert_eq!(read(&disk, "d"), Some(b"4".to_vec()), "written is readable");
        let loss = disk.crash(|pending| {
            assert_eq!(pending, 3);
            1
        });
        assert_eq!(loss, CrashLoss { kept: 1, lost: 2 });
        assert_eq!(read(&disk, "a"), Some(b"1".to_vec()));
        assert_eq!(read(&disk, "b"), Some(b"2".to_vec()));
        assert_eq!(read(&disk, "c"), None);
        assert_eq!(read(&disk, "d"), None);
        assert!(
            disk.get(me, Cf::Log, b"a").is_err(),
            "the old handle is dead"
        );
    }

    #[test]
    fn a_synced_write_makes_earlier_unsynced_ones_durable() {
        let disk = MemDisk::new();
        let me = disk.attach();
        disk.write(me, put("a", "1"), false).unwrap();
        disk.write(me, put("b", "2"), true).unwrap();
        disk.crash(|_| 0);
        assert_eq!(read(&disk, "a"), Some(b"1".to_vec()));
        assert_eq!(read(&disk, "b"), Some(b"2".to_vec()));
    }

    #[test]
    fn a_failed_fsync_applies_nothing_and_stops_the_handle() {
        let disk = MemDisk::new();
        let me = disk.attach();
        disk.fail_syncs(true);
        assert!(disk.write(me, put("a", "1"), true).is_err());
        assert_eq!(
            disk.get(me, Cf::Log, b"a").ok(),
            None,
            "the handle is failed"
        );
        disk.fail_syncs(false);
        assert!(
            disk.write(me, put("b", "2"), false).is_err(),
            "still failed"
        );
        disk.crash(|n| n);
        assert_eq!(read(&disk, "a"), None);
        let next = disk.attach();
        disk.write(next, put("b", "2"), true).unwrap();
        assert_eq!(read(&disk, "b"), Some(b"2".to_vec()));
    }

    #[test]
    fn an_install_is_under_way_from_its_begin_to_its_end_or_a_crash() {
        let disk = MemDisk::new();
        disk.set_install_latency(Duration::from_millis(7));
        assert_eq!(disk.installing(), (false, 0));
        assert_eq!(disk.begin_install(), Duration::from_millis(7));
        assert_eq!(disk.installing(), (true, 1));
        disk.end_install();
        assert_eq!(disk.installing(), (false, 1));
        disk.begin_install();
        disk.crash(|n| n);
        assert_eq!(disk.installing(), (false, 2), "a crash ends it");
    }
}
