//! Verify, rebuild, log dump and inspect user, each either offline (a stopped node's data directory) or online
//! (a running node's admin address). Both paths produce the same report and print it the same
//! way, so an operator reads one format whichever way the check ran.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use courier_archive::{ArchiveStore, S3Archive};
use courier_proto::pb::peer::admin_client::AdminClient;
use courier_proto::pb::peer::projection_job_update::Update;
use courier_proto::pb::peer::{
    InspectUserRequest, ProjectionJobUpdate, ReadLogRequest, RebuildProjectionRequest,
    StatusRequest, VerifyProjectionRequest,
};
use courier_proto::{LogIndex, ShardId};
use courier_storage::Projection;
use courier_storage::archive::{DirArchive, SegmentStore};
use courier_storage::projection::hex;
use courier_storage::rebuild::{self, Verified};
use serde_json::json;
use tonic::Streaming;

use crate::offline;
use crate::online::{admin_at, describe};
use crate::progress::replay_bar;

/// Where a command runs.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Target {
    /// The data directory of a stopped node (contains `db/`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Peer (admin) address of a running node: the command runs on that replica.
    #[arg(long)]
    addr: Option<String>,
}

/// The log archive a command on a stopped node reads entries from that raft purged.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct ArchiveDir {
    /// Offline: the node's log archive, read for entries purged from the live log: its directory
    /// (`archive.dir`), or its bucket as `s3://BUCKET/PREFIX` (`[archive.s3]`; credentials from
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` in the environment). A running node reads
    /// its own.
    #[arg(long = "archive", value_name = "DIR|s3://BUCKET/PREFIX")]
    dir: Option<String>,
    /// With an s3:// archive: the endpoint of an S3-compatible service (default: AWS, or
    /// `AWS_ENDPOINT`).
    #[arg(long = "s3-endpoint", value_name = "URL", requires = "dir")]
    s3_endpoint: Option<String>,
    /// With an s3:// archive: its region (default: `AWS_REGION`, else us-east-1).
    #[arg(long = "s3-region", value_name = "REGION", requires = "dir")]
    s3_region: Option<String>,
    /// With an s3:// archive: accept a plain http:// endpoint (a local test server).
    #[arg(long = "s3-allow-http", requires = "dir")]
    s3_allow_http: bool,
}

impl ArchiveDir {
    /// The archive, for a command on a stopped node.
    ///
    /// # Errors
    /// Bucket settings that are refused, or S3 options without an s3:// archive.
    pub(crate) fn open(&self) -> anyhow::Result<Option<Box<dyn SegmentStore>>> {
        let Some(spec) = &self.dir else {
            return Ok(None);
        };
        let scheme = spec.split_once("://").map(|(scheme, _)| scheme);
        let Some(bucket_path) = spec.strip_prefix("s3://") else {
            if let Some(scheme) = scheme {
                bail!("--archive {spec}: {scheme}:// is not an archive; give a directory or s3://");
            }
            if self.s3_endpoint.is_some() || self.s3_region.is_some() || self.s3_allow_http {
                bail!("--s3-endpoint, --s3-region and --s3-allow-http are for an s3:// archive");
            }
            return Ok(Some(Box::new(DirArchive::new(spec))));
        };
        let (bucket, prefix) = bucket_path.split_once('/').unwrap_or((bucket_path, ""));
        let s3 = S3Archive::new(
            bucket,
            prefix,
            self.s3_endpoint.clone(),
            self.s3_region.clone(),
            self.s3_allow_http,
        )
        .map_err(|reason| anyhow::anyhow!("--archive {spec}: {reason}"))?;
        Ok(Some(Box::new(ArchiveStore::open_standalone(&s3)?)))
    }

    /// The archive, for a command that runs on `target`: refused with `--addr`.
    fn for_target(&self, target: &Target) -> anyhow::Result<Option<Box<dyn SegmentStore>>> {
        if self.dir.is_some() && target.addr.is_some() {
            bail!("--archive is for --data-dir: a running node reads its own archive");
        }
        self.open()
    }
}

/// One differing key, as printed.
#[derive(Debug)]
struct MismatchReport {
    index: u64,
    key: String,
    expected: Option<String>,
    actual: Option<String>,
}

/// One projection's outcome, as printed.
#[derive(Debug)]
struct ProjectionReport {
    name: String,
    entries: u64,
    digest: String,
    mismatches: Vec<MismatchReport>,
    ok: bool,
}

/// One shard's verify outcome, as printed.
#[derive(Debug)]
struct ShardReport {
    shard: u16,
    /// The verify checkpoint the replay started from (0: index 1).
    from: u64,
    /// A checkpoint at `applied` was written.
    checkpoint_written: bool,
    applied: u64,
    events: u64,
    seconds: f64,
    projections: Vec<ProjectionReport>,
}

impl ShardReport {
    fn ok(&self) -> bool {
        self.projections.iter().all(|p| p.ok)
    }

    fn from_offline(shard: ShardId, verified: &Verified, seconds: f64) -> Self {
        Self {
            shard: shard.get(),
            from: verified.from.map_or(0, LogIndex::get),
            checkpoint_written: false,
            applied: verified.live.applied.get(),
            events: verified.rebuilt.events,
            seconds,
            projections: verified
                .comparisons
                .iter()
                .map(|c| ProjectionReport {
                    name: c.projection.name().to_owned(),
                    entries: c.live.entries,
                    digest: format!("{:032x}", c.live.sum),
                    ok: c.is_equal(),
                    mismatches: c
                        .mismatches
                        .iter()
                        .map(|m| MismatchReport {
                            index: m.first_divergent_index.get(),
                            key: hex(&m.key),
                            expected: m.expected.as_deref().map(hex),
                            actual: m.actual.as_deref().map(hex),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn from_online(
        shard: u16,
        response: &courier_proto::pb::peer::VerifyProjectionResponse,
        seconds: f64,
    ) -> Self {
        let present = |bytes: &[u8]| (!bytes.is_empty()).then(|| hex(bytes));
        Self {
            shard,
            from: response.from_checkpoint,
            checkpoint_written: response.checkpoint_written,
            applied: response.applied_index,
            events: response.events_replayed,
            seconds,
            projections: response
                .digests
                .iter()
                .map(|d| {
                    let mismatches: Vec<MismatchReport> = response
                        .mismatches
                        .iter()
                        .filter(|m| m.projection == d.projection)
                        .map(|m| MismatchReport {
                            index: m.first_divergent_index,
                            key: hex(&m.key),
                            expected: present(&m.expected),
                            actual: present(&m.actual),
                        })
                        .collect();
                    ProjectionReport {
                        name: d.projection.clone(),
                        entries: d.entries,
                        digest: hex(&d.digest),
                        ok: mismatches.is_empty(),
                        mismatches,
                    }
                })
                .collect(),
        }
    }

    fn print(&self, as_json: bool) {
        if as_json {
            let projections: Vec<serde_json::Value> = self
                .projections
                .iter()
                .map(|p| {
                    json!({
                        "projection": p.name,
                        "ok": p.ok,
                        "entries": p.entries,
                        "live_digest": p.digest,
                        "mismatches": p.mismatches.iter().map(|m| json!({
                            "first_divergent_index": m.index,
                            "key": m.key,
                            "expected": m.expected,
                            "actual": m.actual,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let out = json!({
                "shard": self.shard,
                "from_checkpoint": self.from,
                "checkpoint_written": self.checkpoint_written,
                "applied": self.applied,
                "events_replayed": self.events,
                "replay_s": self.seconds,
                "ok": self.ok(),
                "projections": projections,
            });
            println!("{out}");
            return;
        }
        let rate = self.events as f64 / self.seconds.max(1e-9);
        let from = match self.from {
            0 => "from=genesis".to_owned(),
            index => format!("from=checkpoint@{index}"),
        };
        println!(
            "shard {} applied={} {from} events_replayed={} replay={:.2}s ({rate:.0} events/s){}",
            self.shard,
            self.applied,
            self.events,
            self.seconds,
            if self.checkpoint_written {
                " checkpoint written"
            } else {
                ""
            }
        );
        println!(
            "{:<10} {:>8} {:<34} result",
            "projection", "entries", "digest"
        );
        for p in &self.projections {
            let result = if p.ok { "ok" } else { "MISMATCH" };
            println!("{:<10} {:>8} {:<34} {result}", p.name, p.entries, p.digest);
            for m in &p.mismatches {
                let absent = || "<absent>".to_owned();
                println!(
                    "  first divergent index {} key {} expected {} actual {}",
                    m.index,
                    if m.key.is_empty() {
                        "<stored digest only>"
                    } else {
                        &m.key
                    },
                    m.expected.clone().unwrap_or_else(absent),
                    m.actual.clone().unwrap_or_else(absent),
                );
            }
        }
    }
}

fn projections_named(name: Option<&str>) -> anyhow::Result<Vec<Projection>> {
    match name {
        None => Ok(Projection::ALL.to_vec()),
        Some(name) => Ok(vec![offline::projection_named(name)?]),
    }
}

/// Verifies one shard (or every shard) and prints a report per shard. Returns whether every
/// projection of every shard matched its log.
///
/// # Errors
/// Usage and connection errors, storage faults, a log purged below a snapshot.
pub(crate) async fn verify(
    target: Target,
    shard: Option<u16>,
    projection: Option<String>,
    as_json: bool,
    (archive, from_genesis): (&ArchiveDir, bool),
) -> anyhow::Result<bool> {
    let mut ok = true;
    let archive = archive.for_target(&target)?;
    let archive = archive.as_deref();
    let from = rebuild::ReplayFrom::genesis_if(from_genesis);
    match (target.data_dir, target.addr) {
        (Some(data_dir), _) => {
            let projections = projections_named(projection.as_deref())?;
            let db = offline::open(&data_dir)?;
            let shards = match shard {
                Some(s) => {
                    offline::require_held(&db, ShardId::new(s))?;
                    vec![ShardId::new(s)]
                }
                None => offline::shards(&db)?,
            };
            for shard in shards {
                let started = Instant::now();
                let total = courier_storage::ShardState::load(db.as_ref(), shard)?.applied;
                let bar = replay_bar(total.get(), &format!("verify shard {}", shard.get()));
                // Offline the replay has the tool's process to itself: no bound but the machine's.
                let verified = rebuild::verify(
                    &db,
                    shard,
                    (archive, from),
                    &projections,
                    usize::MAX,
                    &mut |done, _| {
                        bar.set_position(done.get());
                    },
                )
                .with_context(|| format!("verifying {shard}"))?;
                bar.finish_and_clear();
                let report =
                    ShardReport::from_offline(shard, &verified, started.elapsed().as_secs_f64());
                ok &= report.ok();
                report.print(as_json);
            }
        }
        (None, Some(addr)) => {
            let mut admin = admin_at(&addr).await?;
            let shards = match shard {
                Some(s) => vec![s],
                None => online_shards(&mut admin).await?,
            };
            for shard in shards {
                let started = Instant::now();
                let stream = admin
                    .verify_projection(VerifyProjectionRequest {
                        shard: u32::from(shard),
                        projection: projection.clone().unwrap_or_default(),
                        from_genesis,
                    })
                    .await
                    .map_err(describe)?
                    .into_inner();
                let Update::Verified(response) =
                    follow(stream, &format!("verify shard {shard}")).await?
                else {
                    bail!("the node answered a verify with another job's result");
                };
                let report =
                    ShardReport::from_online(shard, &response, started.elapsed().as_secs_f64());
                ok &= report.ok();
                report.print(as_json);
            }
        }
        (None, None) => bail!("give --data-dir or --addr"),
    }
    Ok(ok)
}

/// Rebuilds one projection of one shard and swaps it in.
///
/// # Errors
/// Without `yes`; usage and connection errors; a data directory in use; storage faults.
pub(crate) async fn rebuild(
    target: Target,
    (archive, from_genesis): (&ArchiveDir, bool),
    shard: u16,
    projection: &str,
    yes: bool,
) -> anyhow::Result<()> {
    let archive = archive.for_target(&target)?;
    let named = offline::projection_named(projection)?;
    if !yes {
        bail!(
            "rebuild rewrites the {} projection of shard {shard}; run again with --yes",
            named.name()
        );
    }
    let started = Instant::now();
    let (applied, entries, events) = match (target.data_dir, target.addr) {
        (Some(data_dir), _) => offline::rebuild(
            &data_dir,
            (
                archive.as_deref(),
                rebuild::ReplayFrom::genesis_if(from_genesis),
            ),
            ShardId::new(shard),
            named,
        )?,
        (None, Some(addr)) => {
            let stream = admin_at(&addr)
                .await?
                .rebuild_projection(RebuildProjectionRequest {
                    shard: u32::from(shard),
                    projection: projection.to_owned(),
                    from_genesis,
                })
                .await
                .map_err(describe)?
                .into_inner();
            let Update::Rebuilt(done) = follow(stream, &format!("rebuild shard {shard}")).await?
            else {
                bail!("the node answered a rebuild with another job's result");
            };
            (done.applied_index, done.entries, done.events_replayed)
        }
        (None, None) => bail!("give --data-dir or --addr"),
    };
    println!(
        "shard {shard} {}: rebuilt {entries} entries at applied index {applied} from {events} events in {:.2}s",
        named.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints entries `from..=to` of a shard's log, offline or from a running replica.
///
/// # Errors
/// Usage and connection errors; storage faults (a checksum mismatch names the index).
pub(crate) async fn log_dump(
    target: Target,
    archive: &ArchiveDir,
    shard: u16,
    (from, to): (Option<u64>, Option<u64>),
    as_json: bool,
) -> anyhow::Result<()> {
    // Indexes start at 1; on the wire 0 means "from the first" / "to the last", so a 0 given
    // here would silently dump the whole log.
    if from == Some(0) || to == Some(0) {
        bail!("log indexes start at 1: give --from and --to of 1 or more");
    }
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        bail!("--from {from} is after --to {to}");
    }
    let archive = archive.for_target(&target)?;
    match (target.data_dir, target.addr) {
        (Some(data_dir), _) => {
            offline::log_dump(&data_dir, archive.as_deref(), shard, (from, to), as_json)
        }
        (None, Some(addr)) => {
            let mut admin = admin_at(&addr).await?;
            let mut next = from.unwrap_or(0);
            loop {
                let page = admin
                    .read_log(ReadLogRequest {
                        shard: u32::from(shard),
                        from: next,
                        to: to.unwrap_or(0),
                        limit: 0,
                    })
                    .await
                    .map_err(describe)?
                    .into_inner();
                if let Some(asked) = from.filter(|f| (1..page.first).contains(f)) {
                    bail!(
                        "shard {shard}: entry {asked} is purged and not in the node's archive (its log starts at {})",
                        page.first
                    );
                }
                let Some(last) = page.entries.last().map(|e| e.index) else {
                    if page.first == 0 {
                        if as_json {
                            eprintln!("shard {shard}: empty log");
                        } else {
                            println!("shard {shard}: empty log");
                        }
                    }
                    return Ok(());
                };
                for entry in &page.entries {
                    let index = LogIndex::new(entry.index);
                    offline::print_entry(index, entry.term, entry.events.as_ref(), as_json);
                }
                if last >= page.last || to.is_some_and(|to| last >= to) {
                    return Ok(());
                }
                next = last.saturating_add(1);
            }
        }
        (None, None) => bail!("give --data-dir or --addr"),
    }
}

/// Prints a user's state at a log index of the user's shard: replayed here from a stopped
/// node's data directory, or on a running replica.
///
/// # Errors
/// Usage and connection errors; storage faults; a purged range no archive holds; an index past
/// the applied one.
pub(crate) async fn inspect_user(
    target: Target,
    archive: &ArchiveDir,
    user: u64,
    shards: Option<u16>,
    at: Option<u64>,
) -> anyhow::Result<()> {
    let archive = archive.for_target(&target)?;
    match (target.data_dir, target.addr) {
        (Some(data_dir), _) => {
            let shards = shards.context("--shards is needed with --data-dir")?;
            crate::inspect::user(&data_dir, archive.as_deref(), user, shards, at)
        }
        (None, Some(addr)) => {
            let stream = admin_at(&addr)
                .await?
                .inspect_user(InspectUserRequest {
                    user,
                    at: at.unwrap_or(0),
                })
                .await
                .map_err(describe)?
                .into_inner();
            let Update::Inspected(done) = follow(stream, &format!("inspect user {user}")).await?
            else {
                bail!("the node answered an inspect with another job's result");
            };
            if done.from_checkpoint > 0 {
                eprintln!(
                    "shard {}: replayed from the verify checkpoint at {}",
                    done.shard, done.from_checkpoint
                );
            }
            let pairs = done
                .pairs
                .into_iter()
                .map(|pair| {
                    let projection =
                        Projection::from_name(&pair.projection).with_context(|| {
                            format!(
                                "the node answered an unknown projection {:?}",
                                pair.projection
                            )
                        })?;
                    Ok((projection, pair.key, pair.value))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let shard = ShardId::new(u16::try_from(done.shard).context("shard id")?);
            let user = courier_proto::UserId::new(user).context("user ids start at 1")?;
            crate::inspect::print_user(
                &pairs,
                (shard, user),
                LogIndex::new(done.at),
                LogIndex::new(done.applied_index),
            );
            Ok(())
        }
        (None, None) => bail!("give --data-dir or --addr"),
    }
}

/// The shards a running node serves.
async fn online_shards(
    admin: &mut AdminClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<u16>> {
    let status = admin
        .status(StatusRequest {})
        .await
        .map_err(describe)?
        .into_inner();
    let mut shards: Vec<u16> = status
        .shards
        .iter()
        .filter_map(|s| u16::try_from(s.shard).ok())
        .collect();
    shards.sort_unstable();
    Ok(shards)
}

/// Follows a job's stream: shows its progress, returns its result.
async fn follow(mut stream: Streaming<ProjectionJobUpdate>, what: &str) -> anyhow::Result<Update> {
    let bar = replay_bar(0, what);
    loop {
        let Some(update) = stream.message().await.map_err(describe)? else {
            bar.finish_and_clear();
            bail!("the node closed the job's stream without a result");
        };
        match update.update {
            Some(Update::Progress(p)) => {
                bar.set_length(p.entries_total);
                bar.set_position(p.entries_done);
            }
            Some(done) => {
                bar.finish_and_clear();
                return Ok(done);
            }
            None => {}
        }
    }
}
