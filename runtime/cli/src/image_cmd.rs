//! `husk image`: disk images, locally (no daemon), in the store `$HUSK_HOME/disk-images/`
//! (see `image_store`) and at plain paths: `ls`, `create` (empty qcow2 images and qcow2
//! overlays), `rm`, `info` and `import` (any format qemu-img reads, converted with Debian's
//! `qemu-img`).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_devices::virtio::block::format::DiskFormat;
use husk_devices::virtio::block::qcow2::{self, Qcow2Error};

use crate::image_store::{
    backing_chain, describe, human_size, is_bare, parse_size, ImageDesc, ImageError, Store,
};
use crate::output::table;
use crate::tty::is_terminal;

/// Disk images (local, no daemon): $HUSK_HOME/disk-images and plain paths.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub verb: ImageVerb,
}

#[derive(Debug, clap::Subcommand)]
pub enum ImageVerb {
    /// List the images of the store
    #[command(alias = "list")]
    Ls(ImageLsArgs),
    /// Create an empty qcow2 image (--size) or a qcow2 overlay over BASE (--backing)
    Create(ImageCreateArgs),
    /// Remove images from the store
    Rm(ImageRmArgs),
    /// Format, sizes and backing chain of an image
    Info(ImageInfoArgs),
    /// Convert a VMDK, VHDX, VDI, raw or qcow2 file into the store (with qemu-img)
    Import(ImageImportArgs),
}

#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct ImageLsArgs {
    /// JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// NAME (no '/') is $HUSK_HOME/disk-images/NAME, with .qcow2 added when it has no extension.
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct ImageCreateArgs {
    /// The image's virtual size (K, M, G, T: powers of 1024) [default with --backing: BASE's]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Make a copy-on-write overlay over BASE (recorded by its absolute path; a bare name is
    /// a store image)
    #[arg(long, value_name = "BASE")]
    pub backing: Option<String>,
    /// BASE's format [default: from its name, .qcow2 or else raw]
    #[arg(long, value_name = "raw|qcow2", requires = "backing")]
    pub backing_format: Option<DiskFormat>,
    #[arg(value_name = "NAME_OR_PATH")]
    pub image: String,
}

#[derive(Debug, clap::Args)]
pub struct ImageRmArgs {
    #[arg(value_name = "NAME_OR_PATH", required = true)]
    pub images: Vec<String>,
}

#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct ImageInfoArgs {
    /// The image's format [default: from its name, .qcow2 or else raw]
    #[arg(long, value_name = "raw|qcow2")]
    pub format: Option<DiskFormat>,
    /// JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[arg(value_name = "NAME_OR_PATH")]
    pub image: String,
}

#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct ImageImportArgs {
    /// The format to store the image in
    #[arg(long, value_name = "qcow2|raw", default_value = "qcow2")]
    pub format: DiskFormat,
    /// FILE's format, as qemu-img names it (vmdk, vhdx, vdi, raw, qcow2...) [default: what
    /// `qemu-img info` detects; a detected image with a backing file is refused]
    #[arg(long, value_name = "FMT")]
    pub source_format: Option<String>,
    /// The file to convert
    #[arg(value_name = "FILE")]
    pub file: String,
    /// The name in the store [default: FILE's name with the format's extension]
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
}

/// Runs `husk image VERB`; the exit code (failures are errors, exit 125).
pub fn run(args: &ImageArgs) -> Result<i32, ImageError> {
    let store = Store::from_env()?;
    match &args.verb {
        ImageVerb::Ls(a) => ls(&store, a),
        ImageVerb::Create(a) => {
            let path = create(&store, a)?;
            emit(&format!("{}\n", path.display()))?;
            Ok(0)
        }
        ImageVerb::Rm(a) => Ok(rm(&store, a)),
        ImageVerb::Info(a) => info(&store, a),
        ImageVerb::Import(a) => import(&store, a),
    }
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<(), ImageError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ImageError::new(format!("stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn size_cell(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), human_size)
}

fn ls(store: &Store, args: &ImageLsArgs) -> Result<i32, ImageError> {
    let images = store.list()?;
    if args.json {
        let text = serde_json::to_string_pretty(&images)
            .map_err(|e| ImageError::new(format!("json: {e}")))?;
        emit(&format!("{text}\n"))?;
        return Ok(0);
    }
    for d in &images {
        if let Some(e) = d.error.as_ref().or(d.warning.as_ref()) {
            eprintln!("husk: warning: {e}");
        }
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                if d.error.is_some() {
                    format!("{} (unreadable)", d.format)
                } else {
                    d.format.clone()
                },
                size_cell(d.virtual_size),
                human_size(d.used_bytes),
                d.backing_file.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    emit(&table(
        &["NAME", "FORMAT", "SIZE", "USED", "BACKING"],
        &rows,
    ))?;
    Ok(0)
}

/// Creates the image `args` describe; its path.
pub fn create(store: &Store, args: &ImageCreateArgs) -> Result<PathBuf, ImageError> {
    let path = store.new_image_path(&args.image, "qcow2")?;
    if DiskFormat::by_name(&path) != DiskFormat::Qcow2 {
        return Err(ImageError::new(format!(
            "{}: the name must end in .qcow2 (husk takes an image's format from its name)",
            path.display()
        )));
    }
    // Check the base before anything is written.
    let backing = match &args.backing {
        Some(base) => Some(check_base(store, base, args.backing_format)?),
        None => None,
    };
    let size = match (args.size, &backing) {
        (Some(size), _) => size,
        (None, Some((_, _, base_size))) => *base_size,
        (None, None) => {
            return Err(ImageError::new(
                "give the new image a --size, or a --backing BASE to take its size from",
            ))
        }
    };
    if is_bare(&args.image) {
        store.ensure_dir()?;
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ImageError::new(format!(
                    "{} already exists (husk image rm it first, or pick another name)",
                    path.display()
                ))
            } else {
                ImageError::io(&path, e)
            }
        })?;
    let written = qcow2::create(
        &file,
        size,
        backing
            .as_ref()
            .map(|(name, format, _)| (name.as_str(), *format)),
    );
    if let Err(e) = written {
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(ImageError::io(&path, e));
    }
    Ok(path)
}

/// BASE as an overlay records it: its absolute canonical path, its format (checked against its
/// contents) and its virtual size.
fn check_base(
    store: &Store,
    base: &str,
    stated: Option<DiskFormat>,
) -> Result<(String, DiskFormat, u64), ImageError> {
    let given = store.existing_image_path(base)?;
    let canonical = fs::canonicalize(&given).map_err(|e| ImageError::io(&given, e))?;
    let name = canonical
        .to_str()
        .ok_or_else(|| ImageError::io(&canonical, "the path is not UTF-8"))?
        .to_string();
    let format = stated.unwrap_or_else(|| DiskFormat::by_name(&canonical));
    let file = File::open(&canonical).map_err(|e| ImageError::io(&given, e))?;
    let meta = file.metadata().map_err(|e| ImageError::io(&given, e))?;
    if !meta.is_file() {
        return Err(ImageError::io(&given, "not an image file"));
    }
    let size = match format {
        DiskFormat::Raw if qcow2::has_magic(&file) => {
            return Err(ImageError::new(format!(
                "{} looks like qcow2: pass --backing-format qcow2",
                given.display()
            )))
        }
        DiskFormat::Raw => meta.len(),
        DiskFormat::Qcow2 => match qcow2::info(&file) {
            Ok(info) => info.virtual_size,
            Err(Qcow2Error::NotQcow2) => {
                return Err(ImageError::new(format!(
                    "{} is not a qcow2 image (no qcow2 magic): pass --backing-format raw if it \
                     is a raw image",
                    given.display()
                )))
            }
            Err(e) => return Err(ImageError::io(&given, e)),
        },
    };
    if size == 0 {
        return Err(ImageError::io(&given, "an empty image cannot be a base"));
    }
    Ok((name, format, size))
}

fn rm(store: &Store, args: &ImageRmArgs) -> i32 {
    let mut code = 0;
    for (_, outcome) in store.remove(&args.images) {
        match outcome {
            Ok(path) => {
                let _ = emit(&format!("{}\n", path.display()));
            }
            Err(e) => {
                eprintln!("husk: error: {e}");
                code = crate::quick_launch::EXIT_HUSK_ERROR;
            }
        }
    }
    code
}

/// `husk image info --json`.
#[derive(Debug, serde::Serialize)]
struct InfoJson<'a> {
    #[serde(flatten)]
    image: &'a ImageDesc,
    /// The backing files, from the image's own down.
    chain: &'a [ImageDesc],
}

fn info(store: &Store, args: &ImageInfoArgs) -> Result<i32, ImageError> {
    let path = store.existing_image_path(&args.image)?;
    let format = args.format.unwrap_or_else(|| DiskFormat::by_name(&path));
    let image = describe(&path, format)?;
    let chain = backing_chain(&image)?;
    if let Some(w) = &image.warning {
        eprintln!("husk: warning: {w}");
    }
    if args.json {
        let text = serde_json::to_string_pretty(&InfoJson {
            image: &image,
            chain: &chain,
        })
        .map_err(|e| ImageError::new(format!("json: {e}")))?;
        emit(&format!("{text}\n"))?;
        return Ok(0);
    }
    emit(&info_text(&image, &chain))?;
    Ok(0)
}

fn info_text(image: &ImageDesc, chain: &[ImageDesc]) -> String {
    let mut out = format!("path:          {}\n", image.path);
    out += &format!("format:        {}\n", image.format);
    if let Some(size) = image.virtual_size {
        out += &format!("virtual size:  {} ({size} bytes)\n", human_size(size));
    }
    out += &format!("used:          {}\n", human_size(image.used_bytes));
    if let Some(cs) = image.cluster_size {
        out += &format!("cluster size:  {}\n", human_size(cs));
    }
    if let (Some(name), Some(format)) = (&image.backing_file, &image.backing_format) {
        out += &format!("backing file:  {name} ({format})\n");
    }
    if !chain.is_empty() {
        out += "backing chain:\n";
        let rows: Vec<Vec<String>> = std::iter::once(image)
            .chain(chain)
            .map(|d| {
                vec![
                    d.path.clone(),
                    d.format.clone(),
                    size_cell(d.virtual_size),
                    human_size(d.used_bytes),
                ]
            })
            .collect();
        for line in table(&["PATH", "FORMAT", "SIZE", "USED"], &rows).lines() {
            out += &format!("  {line}\n");
        }
    }
    out
}

// ---- import ----

/// Set by SIGINT, SIGTERM or SIGHUP while an import runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches Ctrl-C (and SIGTERM, SIGHUP) so that the import can remove its temporary file.
/// qemu-img gets the default actions back when it execs (a caught signal is reset there).
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `action` is fully initialised (zeroed, then an empty mask); the handler only
        // stores to an atomic, which is async-signal-safe; SA_RESTART keeps the blocking reads
        // of the other threads going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// qemu-img on PATH.
fn qemu_img() -> Result<PathBuf, ImageError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("qemu-img"))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::new("qemu-img not found: apt-get install qemu-utils"))
}

/// A qemu-img format name: letters, digits, '_', '-', '.'.
fn check_format_name(name: &str) -> Result<(), ImageError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        || name.starts_with('-')
    {
        return Err(ImageError::new(format!(
            "{name:?} is not a format name (vmdk, vhdx, vdi, raw, qcow2...)"
        )));
    }
    Ok(())
}

/// What `qemu-img info --output=json` says matters here: the format and the backing file.
fn detected(json: &str) -> Result<(String, Option<String>), String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let format = v
        .get("format")
        .and_then(|f| f.as_str())
        .ok_or("no \"format\" in its output")?
        .to_string();
    let backing = v
        .get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_string);
    Ok((format, backing))
}

/// The last `(NN.NN/100%)` in qemu-img's progress output, in hundredths of a percent.
fn last_progress(text: &str) -> Option<u32> {
    text.rsplit(['\r', '\n']).find_map(|line| {
        let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
        let pct: f64 = inner.parse().ok()?;
        (0.0..=100.0)
            .contains(&pct)
            .then(|| (pct * 100.0).round() as u32)
    })
}

fn progress_bar(what: &str, hundredths: u32, elapsed: Duration) -> String {
    const WIDTH: usize = 30;
    let filled = (hundredths as usize * WIDTH / 10_000).min(WIDTH);
    format!(
        "{what} [{}{}] {:5.1}%  {:.1} s",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        f64::from(hundredths) / 100.0,
        elapsed.as_secs_f64()
    )
}

/// Removes the file when dropped unless kept.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Runs `qemu-img` with `args`; its stdout, or its error message.
fn qemu_img_output(qemu: &Path, args: &[&std::ffi::OsStr]) -> Result<String, ImageError> {
    let out = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io(qemu, e))?;
    if !out.status.success() {
        return Err(ImageError::new(format!(
            "qemu-img {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn import(store: &Store, args: &ImageImportArgs) -> Result<i32, ImageError> {
    let started = Instant::now();
    let given = Path::new(&args.file);
    // Absolute: qemu-img never takes it for an option or a protocol ("nbd:...").
    let source = fs::canonicalize(given).map_err(|e| ImageError::io(given, e))?;
    if !fs::metadata(&source).is_ok_and(|m| m.is_file()) {
        return Err(ImageError::io(given, "not a file"));
    }
    let ext = args.format.to_string();
    let name = match &args.name {
        Some(n) if !is_bare(n) => {
            return Err(ImageError::new(format!(
                "{n:?}: import writes into the image store, give a NAME without '/'"
            )))
        }
        Some(n) => n.clone(),
        None => source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let dest = store.new_image_path(&name, &ext)?;
    if DiskFormat::by_name(&dest) != args.format {
        return Err(ImageError::new(format!(
            "{}: a {} image's name must {} (husk takes an image's format from its name)",
            dest.display(),
            args.format,
            match args.format {
                DiskFormat::Qcow2 => "end in .qcow2",
                DiskFormat::Raw => "not end in .qcow2",
            }
        )));
    }
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(ImageError::new(format!(
            "{} already exists (husk image rm it first, or give another NAME)",
            dest.display()
        )));
    }
    if let Some(f) = &args.source_format {
        check_format_name(f)?;
    }
    let qemu = qemu_img()?;
    catch_interrupts();

    let source_format = match &args.source_format {
        Some(f) => f.clone(),
        None => {
            let info = qemu_img_output(
                &qemu,
                &[
                    "info".as_ref(),
                    "--output=json".as_ref(),
                    source.as_os_str(),
                ],
            );
            let json = match info {
                Ok(json) => json,
                Err(_) if INTERRUPTED.load(Ordering::SeqCst) => return Ok(interrupted()),
                Err(e) => return Err(e),
            };
            let (format, backing) = detected(&json)
                .map_err(|e| ImageError::new(format!("qemu-img info {}: {e}", source.display())))?;
            if let Some(b) = backing {
                return Err(ImageError::new(format!(
                    "{} is a {format} image with a backing file ({b}): an imported image must \
                     not pull in other host files; flatten it first, or pass --source-format \
                     {format} to copy its backing files' contents in too",
                    given.display()
                )));
            }
            check_format_name(&format)?;
            format
        }
    };
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(interrupted());
    }

    store.ensure_dir()?;
    let temp_path = store
        .dir
        .join(format!(".{name}.import-{}.tmp", std::process::id()));
    File::options()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(|e| ImageError::io(&temp_path, e))?;
    let mut temp = TempFile {
        path: temp_path,
        keep: false,
    };

    let mut child = Command::new(&qemu)
        .args(["convert", "-p", "-f", &source_format, "-O", &ext])
        .arg(&source)
        .arg(&temp.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ImageError::io(&qemu, e))?;
    let progress = Arc::new(AtomicU32::new(0));
    let mut stdout = child.stdout.take();
    let seen = progress.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut tail = String::new();
        while let Some(Ok(n @ 1..)) = stdout.as_mut().map(|s| s.read(&mut buf)) {
            tail.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Some(p) = last_progress(&tail) {
                seen.store(p, Ordering::Relaxed);
            }
            // Keep only the unfinished last line.
            if let Some(at) = tail.rfind(['\r', '\n']) {
                tail.drain(..=at);
            }
        }
    });
    let mut stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let show = is_terminal(std::io::stderr());
    let what = format!(
        "importing {}",
        dest.file_name().unwrap_or_default().to_string_lossy()
    );
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(ImageError::io(&qemu, e)),
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            if show {
                eprint!("\r\x1b[2K");
            }
            return Ok(interrupted());
        }
        if show {
            eprint!(
                "\r\x1b[2K{}",
                progress_bar(&what, progress.load(Ordering::Relaxed), started.elapsed())
            );
            let _ = std::io::stderr().flush();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = reader.join();
    let qemu_errors = errors.join().unwrap_or_default();
    if show {
        eprint!("\r\x1b[2K");
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(interrupted());
    }
    if !status.success() {
        return Err(ImageError::new(format!(
            "qemu-img convert {} ({status}): {}",
            given.display(),
            qemu_errors.trim()
        )));
    }
    // What husk will read: the image must open as its format says.
    let desc = describe(&temp.path, args.format)?;
    File::open(&temp.path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io(&temp.path, e))?;
    rename_new(&temp.path, &dest)?;
    temp.keep = true;
    if let Ok(dir) = File::open(&store.dir) {
        let _ = dir.sync_all();
    }
    emit(&format!(
        "{}: {}, {} ({} used), imported from {} ({source_format}) in {:.1} s\n",
        dest.display(),
        args.format,
        size_cell(desc.virtual_size),
        human_size(desc.used_bytes),
        given.display(),
        started.elapsed().as_secs_f64()
    ))?;
    Ok(0)
}

fn interrupted() -> i32 {
    eprintln!("husk: import interrupted; nothing was written");
    130
}

/// Renames `from` to `to` unless `to` exists (then an error, `from` left alone).
fn rename_new(from: &Path, to: &Path) -> Result<(), ImageError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let exists = || {
        ImageError::new(format!(
            "{} already exists (husk image rm it first, or give another NAME)",
            to.display()
        ))
    };
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(exists()),
        // A filesystem without RENAME_NOREPLACE: a hard link fails on an existing name too.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            fs::hard_link(from, to).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    exists()
                } else {
                    ImageError::io(to, e)
                }
            })?;
            fs::remove_file(from).map_err(|e| ImageError::io(from, e))
        }
        Err(e) => Err(ImageError::io(to, std::io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::{Cli, Verb};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<ImageVerb, clap::Error> {
        let cli = Cli::try_parse_from(["husk", "image"].iter().chain(args))?;
        match cli.command {
            Verb::Image(i) => Ok(i.verb),
            other => panic!("not image: {other:?}"),
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let home = tempfile::tempdir().unwrap();
        let store = Store {
            dir: home.path().join("disk-images"),
        };
        (home, store)
    }

    fn create_args(image: &str, size: Option<u64>, backing: Option<&str>) -> ImageCreateArgs {
        ImageCreateArgs {
            size,
            backing: backing.map(str::to_string),
            backing_format: None,
            image: image.into(),
        }
    }

    #[test]
    fn image_is_a_local_verb_with_its_subcommands() {
        assert!(!Verb::is_remote("image"));
        let ImageVerb::Create(c) = parse(&["create", "dev", "--size", "10G"]).unwrap() else {
            panic!("not create");
        };
        assert_eq!((c.image.as_str(), c.size), ("dev", Some(10 << 30)));
        let ImageVerb::Create(c) = parse(&[
            "create",
            "top",
            "--backing",
            "/b.img",
            "--backing-format",
            "qcow2",
        ])
        .unwrap() else {
            panic!("not create");
        };
        assert_eq!(c.backing_format, Some(DiskFormat::Qcow2));
        assert!(parse(&["create", "x", "--backing-format", "raw", "--size", "1G"]).is_err());
        assert!(parse(&["create", "x", "--size", "1.5G"]).is_err());
        let ImageVerb::Import(i) = parse(&["import", "a.vmdk"]).unwrap() else {
            panic!("not import");
        };
        assert_eq!(
            (i.format, i.source_format, i.name),
            (DiskFormat::Qcow2, None, None)
        );
        assert!(parse(&["import", "a.vmdk", "--format", "vmdk"]).is_err());
        assert!(matches!(
            parse(&["ls", "--json"]),
            Ok(ImageVerb::Ls(ImageLsArgs { json: true }))
        ));
        assert!(parse(&["rm"]).is_err(), "at least one image");
        assert!(parse(&[]).is_err(), "a subcommand");
    }

    #[test]
    fn create_makes_empty_images_and_overlays_and_never_overwrites() {
        let (home, store) = store();
        let dev = create(&store, &create_args("dev", Some(64 << 20), None)).unwrap();
        assert_eq!(dev, store.dir.join("dev.qcow2"));
        let d = describe(&dev, DiskFormat::Qcow2).unwrap();
        assert_eq!((d.virtual_size, d.backing_file), (Some(64 << 20), None));
        let e = create(&store, &create_args("dev.qcow2", Some(1 << 20), None)).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(
            describe(&dev, DiskFormat::Qcow2).unwrap().virtual_size,
            Some(64 << 20)
        );
        let e = create(&store, &create_args("dev2", None, None)).unwrap_err();
        assert!(e.to_string().contains("--size"), "{e}");
        let e = create(&store, &create_args("dev.img", Some(1 << 20), None)).unwrap_err();
        assert!(e.to_string().contains(".qcow2"), "{e}");

        // An overlay takes its base's size and records its canonical path and format.
        let top = create(&store, &create_args("top", None, Some("dev"))).unwrap();
        let t = describe(&top, DiskFormat::Qcow2).unwrap();
        assert_eq!(t.virtual_size, Some(64 << 20));
        assert_eq!(
            t.backing_file.as_deref(),
            fs::canonicalize(&dev).unwrap().to_str()
        );
        assert_eq!(t.backing_format.as_deref(), Some("qcow2"));
        // A raw base outside the store, by path.
        let raw = home.path().join("base.img");
        fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let path = home.path().join("over.qcow2");
        let o = create(
            &store,
            &create_args(
                path.to_str().unwrap(),
                Some(2 << 20),
                Some(raw.to_str().unwrap()),
            ),
        )
        .unwrap();
        let o = describe(&o, DiskFormat::Qcow2).unwrap();
        assert_eq!(o.virtual_size, Some(2 << 20));
        assert_eq!(o.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn a_base_whose_contents_disagree_with_its_format_is_refused() {
        let (home, store) = store();
        // qcow2 contents under a raw name.
        let disguised = home.path().join("disk.img");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&disguised)
            .unwrap();
        qcow2::create(&f, 1 << 20, None).unwrap();
        let e = create(
            &store,
            &create_args("a", None, Some(disguised.to_str().unwrap())),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("looks like qcow2: pass --backing-format qcow2"),
            "{e}"
        );
        let mut ok = create_args("a", None, Some(disguised.to_str().unwrap()));
        ok.backing_format = Some(DiskFormat::Qcow2);
        create(&store, &ok).unwrap();
        // Raw contents stated as qcow2.
        let raw = home.path().join("raw.qcow2");
        fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let e = create(&store, &create_args("b", None, Some(raw.to_str().unwrap()))).unwrap_err();
        assert!(e.to_string().contains("--backing-format raw"), "{e}");
        assert!(!store.dir.join("b.qcow2").exists());
        let e = create(&store, &create_args("c", None, Some("/no/such/base.raw"))).unwrap_err();
        assert!(e.to_string().contains("/no/such/base.raw"), "{e}");
    }

    #[test]
    fn qemu_img_output_is_understood() {
        assert_eq!(
            last_progress("    (0.00/100%)\r    (45.50/100%)\r"),
            Some(4550)
        );
        assert_eq!(last_progress("    (100.00/100%)\n"), Some(10000));
        assert_eq!(last_progress("    (12.0"), None);
        assert_eq!(
            detected(r#"{"format": "vmdk", "virtual-size": 1}"#),
            Ok(("vmdk".into(), None))
        );
        assert_eq!(
            detected(r#"{"format": "qcow2", "backing-filename": "/etc/x"}"#),
            Ok(("qcow2".into(), Some("/etc/x".into())))
        );
        assert!(detected("{}").is_err());
        assert!(check_format_name("vmdk").is_ok());
        assert!(check_format_name("-o").is_err());
        assert!(check_format_name("a b").is_err());
        let bar = progress_bar("importing x", 5000, Duration::from_secs(2));
        assert!(
            bar.contains("[###############---------------]  50.0%"),
            "{bar}"
        );
    }

    #[test]
    fn rename_new_never_replaces() {
        let (home, _) = store();
        let (a, b) = (home.path().join("a"), home.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        assert!(rename_new(&a, &b)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert_eq!(fs::read(&b).unwrap(), b"b");
        fs::remove_file(&b).unwrap();
        rename_new(&a, &b).unwrap();
        assert!(!a.exists() && b.exists());
    }

    #[test]
    fn info_text_shows_the_chain() {
        let (home, store) = store();
        let base = home.path().join("base.raw");
        fs::write(&base, vec![1u8; 1 << 20]).unwrap();
        let top = create(
            &store,
            &create_args("top", None, Some(base.to_str().unwrap())),
        )
        .unwrap();
        let image = describe(&top, DiskFormat::Qcow2).unwrap();
        let chain = backing_chain(&image).unwrap();
        let text = info_text(&image, &chain);
        assert!(
            text.contains("virtual size:  1 MiB (1048576 bytes)"),
            "{text}"
        );
        assert!(text.contains("cluster size:  64 KiB"), "{text}");
        assert!(
            text.contains(&format!(
                "backing file:  {} (raw)",
                fs::canonicalize(&base).unwrap().display()
            )),
            "{text}"
        );
        assert!(text.contains("backing chain:"), "{text}");
    }
}
