//! The `blockd` binary: `blockd serve` runs the daemon; every other subcommand except
//! `verify` is a client of its REST API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use blockd::cli::{self, Output, client::Client, transfer};
use blockd::daemon::{self, ServeConfig};
use blockd::nbd::Limits;
use blockd::size;
use blockd::store::io::IoEngine;

#[derive(Debug, Parser)]
#[command(
    name = "blockd",
    version,
    about = "Copy-on-write block device server: snapshot and clone volumes over NBD",
    after_help = "Run `blockd serve` on the storage host; the other subcommands talk to it over its REST API."
)]
struct Cli {
    /// REST API address. For `serve`: where to listen (IP:PORT). For the other
    /// subcommands: where the daemon listens (IP:PORT or http://IP:PORT).
    #[arg(
        long,
        global = true,
        env = "BLOCKD_API",
        default_value = "127.0.0.1:7480"
    )]
    api: String,
    /// Bearer token for the REST API.
    #[arg(long, global = true, env = "BLOCKD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format of the client subcommands.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: NBD server, REST API, store.
    Serve(ServeArgs),
    /// Create, clone, import, export, reset, list, show and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list and delete snapshots (VOLUME@SNAP).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Database images: build (from empty or a pg_basebackup), list, show, delete.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Sources: standbys kept in sync with a production primary, refreshed into revisions.
    #[command(subcommand)]
    Source(SourceCmd),
    /// Database clones: writable copies of an image or source revision attached to running
    /// PostgreSQL.
    #[command(subcommand)]
    Clone(CloneCmd),
    /// API tokens (admin and user roles).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Space used by the whole store: logical, referenced, stored, physical.
    Df,
    /// Run one compaction pass now (the daemon also runs them in the background).
    Compact,
    /// Check a store offline (daemon stopped): every record, checksum and reference.
    Verify {
        /// The data directory to check.
        #[arg(long, env = "BLOCKD_DATA_DIR", default_value = "/var/lib/blockd")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Directory holding the store, its catalog and (by default) the NBD Unix socket.
    #[arg(long, env = "BLOCKD_DATA_DIR", default_value = "/var/lib/blockd")]
    data_dir: PathBuf,
    /// TCP address for NBD clients (IP:PORT; port 0 picks a free one), or `none`.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Unix socket for NBD clients; default `<data-dir>/nbd.sock`; `none` to disable.
    #[arg(long)]
    socket: Option<String>,
    /// Most NBD connections served at once; further connections are closed at accept.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Time a client has to complete the NBD handshake (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// On SIGTERM, time connections get to finish in-flight requests before being cut.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Time between background compaction passes (e.g. 30s; 0 disables them).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    compact_interval: Duration,
    /// Ports for database clones, FIRST-LAST.
    #[arg(long, default_value = "15432-15999", value_parser = parse_port_range)]
    clone_ports: (u16, u16),
    /// Address database clones listen on (127.0.0.1 keeps them on this host).
    #[arg(long, default_value = "127.0.0.1")]
    clone_listen: String,
    /// Time between checks for expired clones and images (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    expiry_interval: Duration,
    /// Write a JSON file with the pid and the actual addresses once listening (useful with
    /// port 0).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// How the store reads and writes its files: `sync` (pread/pwrite/fdatasync) or `uring`
    /// (io_uring, one ring per I/O thread; fails at start-up if the kernel refuses it).
    /// Same bytes on disk either way. See docs/BENCHMARKS.md for the measurements behind
    /// the default.
    #[arg(long, env = "BLOCKD_IO_ENGINE", value_enum, default_value_t = IoEngineArg::Sync)]
    io_engine: IoEngineArg,
    /// Writes of at least this size (and page-aligned) go to disk around the page cache
    /// (O_DIRECT, where the file system allows it), e.g. 256K; `off` caches every write.
    /// Large streaming writes then cost no page-cache memory and no writeback; smaller
    /// writes stay cached for the reads that usually follow them.
    #[arg(long, env = "BLOCKD_DIRECT_WRITES_FROM", default_value = "256K",
          value_parser = parse_direct_writes_from)]
    direct_writes_from: u64,
}

fn parse_direct_writes_from(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let n = size::parse_size(s).map_err(|e| format!("{e}, or `off`"))?;
    if n == 0 || !n.is_multiple_of(4096) {
        return Err(format!(
            "{s:?} is not a multiple of 4 KiB above zero: give a size such as 256K, or `off`"
        ));
    }
    Ok(n)
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum IoEngineArg {
    Sync,
    Uring,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range like 15432-15999"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a < 1024 || b < a {
        return Err(format!("{s:?}: give FIRST-LAST with 1024 <= FIRST <= LAST"));
    }
    Ok((a, b))
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create an empty (sparse) volume.
    Create {
        name: String,
        /// Logical size: bytes, or with a suffix K, M, G, T (powers of 1024), e.g. 10G.
        #[arg(long)]
        size: String,
    },
    /// Create a writable clone of a snapshot: VOLUME@SNAP NEWNAME (O(1), no data copied).
    Clone { source: String, name: String },
    /// Import a raw image file as a new volume (holes and zeroes take no space).
    Import {
        name: String,
        #[arg(long)]
        from: PathBuf,
    },
    /// Export a volume or snapshot to a raw image file (sparse).
    Export {
        /// VOLUME or VOLUME@SNAP.
        name: String,
        #[arg(long)]
        to: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Throw away everything written since the volume's origin snapshot.
    Reset { name: String },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Delete a volume (refused while NBD clients have it open).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Freeze a volume's current contents as VOLUME@SNAP (O(1), read-only).
    Create { name: String },
    /// List snapshots, of one volume or of all.
    List { volume: Option<String> },
    /// Delete VOLUME@SNAP (refused while clones of it exist, unless --defer).
    Delete {
        name: String,
        /// Hide it now and free its space when the last clone of it is deleted.
        #[arg(long)]
        defer: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build an image from a definition file (YAML); waits and shows progress.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    List,
    Show {
        name: String,
    },
    /// Delete an image (refused while clones use it).
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SourceCmd {
    /// Create a source from a definition file (YAML): copies the primary with
    /// pg_basebackup, starts the standby and makes the first revision; waits and shows progress.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    List,
    /// Replication state (replay LSN and time, lag) and the revisions.
    Show {
        name: String,
    },
    /// Make a revision now: SOURCE@N, clonable with `clone create SOURCE@N NAME`.
    Refresh {
        name: String,
    },
    /// Stop the standby and delete the source with its revisions (refused while clones use
    /// one).
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum CloneCmd {
    /// Create a writable clone attached to a running PostgreSQL; prints how to connect.
    /// FROM is an image, or a source revision: SOURCE (the newest), SOURCE@N, or
    /// SOURCE@2026-11-22T10:00 (the newest at or before that time, UTC).
    Create {
        #[arg(value_name = "FROM")]
        image: String,
        name: String,
        /// Port for the database (default: a free one from --clone-ports of the daemon).
        #[arg(long)]
        port: Option<u16>,
        /// Delete it automatically after this long (e.g. 30m, 8h; 0 = never).
        #[arg(long)]
        lifetime: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    /// Stop the database and detach the volume (the clone keeps its data).
    Stop {
        name: String,
    },
    /// Attach and start a stopped clone.
    Start {
        name: String,
    },
    /// Throw away every change: back to its image or revision, same port and password.
    Reset {
        name: String,
    },
    /// Save the clone's current contents as a new image (branch from a branch).
    Save {
        name: String,
        image: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token (printed once). Once any token exists the API requires one.
    Create {
        name: String,
        /// admin (everything) or user (own clones, read images).
        #[arg(long, default_value = "user")]
        role: String,
    },
    List,
    Delete {
        name: String,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: log files and pipes get plain text that grep can read.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_tracing("info");
            serve(args, cli.api)
        }
        Command::Verify { data_dir } => {
            init_tracing("warn");
            blockd::store::verify::run(&data_dir, cli.output == Output::Json)
        }
        cmd => {
            init_tracing("warn");
            let client = Client::new(&cli.api, cli.token);
            client_command(&client, cli.output, cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs, api: String) -> Result<()> {
    let none = |s: &str| s.eq_ignore_ascii_case("none");
    let socket = match args.socket.as_deref() {
        Some(s) if none(s) => None,
        Some(s) => Some(PathBuf::from(s)),
        None => Some(args.data_dir.join("nbd.sock")),
    };
    let listen = if none(&args.listen) {
        None
    } else {
        Some(args.listen)
    };
    let limits = Limits {
        handshake_timeout: args.handshake_timeout,
        max_connections: args.max_connections,
        shutdown_grace: args.shutdown_grace,
        ..Limits::default()
    };
    daemon::run(ServeConfig {
        data_dir: args.data_dir,
        listen,
        socket,
        api,
        limits,
        ready_file: args.ready_file,
        compact_interval: args.compact_interval,
        clone_ports: args.clone_ports,
        clone_listen: args.clone_listen,
        expiry_interval: args.expiry_interval,
        io_engine: match args.io_engine {
            IoEngineArg::Sync => IoEngine::Sync,
            IoEngineArg::Uring => IoEngine::Uring,
        },
        direct_write_min_bytes: args.direct_writes_from,
    })
}

fn client_command(c: &Client, out: Output, cmd: Command) -> Result<()> {
    match cmd {
        Command::Volume(v) => match v {
            VolumeCmd::Create { name, size } => cli::volume_create(c, out, &name, &size),
            VolumeCmd::Clone { source, name } => cli::volume_clone(c, out, &source, &name),
            VolumeCmd::Import { name, from } => transfer::import(c, out, &name, &from),
            VolumeCmd::Export { name, to, force } => transfer::export(c, out, &name, &to, force),
            VolumeCmd::Reset { name } => cli::volume_reset(c, out, &name),
            VolumeCmd::List => cli::volume_list(c, out),
            VolumeCmd::Show { name } => cli::volume_show(c, out, &name),
            VolumeCmd::Delete { name } => cli::volume_delete(c, out, &name),
        },
        Command::Snapshot(s) => match s {
            SnapshotCmd::Create { name } => cli::snapshot_create(c, out, &name),
            SnapshotCmd::List { volume } => cli::snapshot_list(c, out, volume.as_deref()),
            SnapshotCmd::Delete { name, defer } => cli::snapshot_delete(c, out, &name, defer),
        },
        Command::Image(i) => match i {
            ImageCmd::Create { file } => cli::db::image_create(c, out, &file),
            ImageCmd::List => cli::db::image_list(c, out),
            ImageCmd::Show { name } => cli::db::image_show(c, out, &name),
            ImageCmd::Delete { name } => cli::db::image_delete(c, out, &name),
        },
        Command::Source(s) => match s {
            SourceCmd::Create { file } => cli::source::create(c, out, &file),
            SourceCmd::List => cli::source::list(c, out),
            SourceCmd::Show { name } => cli::source::show(c, out, &name),
            SourceCmd::Refresh { name } => cli::source::refresh(c, out, &name),
            SourceCmd::Delete { name } => cli::source::delete(c, out, &name),
        },
        Command::Clone(k) => match k {
            CloneCmd::Create {
                image,
                name,
                port,
                lifetime,
            } => cli::db::clone_create(c, out, &image, &name, port, lifetime.as_deref()),
            CloneCmd::List => cli::db::clone_list(c, out),
            CloneCmd::Show { name } => cli::db::clone_show(c, out, &name),
            CloneCmd::Stop { name } => cli::db::clone_action(c, out, &name, "stop"),
            CloneCmd::Start { name } => cli::db::clone_action(c, out, &name, "start"),
            CloneCmd::Reset { name } => cli::db::clone_action(c, out, &name, "reset"),
            CloneCmd::Save { name, image } => cli::db::clone_save(c, out, &name, &image),
            CloneCmd::Delete { name } => cli::db::clone_delete(c, out, &name),
        },
        Command::Token(t) => match t {
            TokenCmd::Create { name, role } => cli::db::token_create(c, out, &name, &role),
            TokenCmd::List => cli::db::token_list(c, out),
            TokenCmd::Delete { name } => cli::db::token_delete(c, out, &name),
        },
        Command::Df => cli::df(c, out),
        Command::Compact => cli::compact(c, out),
        Command::Serve(_) | Command::Verify { .. } => Ok(()),
    }
}
