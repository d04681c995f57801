//! The part of an OCI bundle's `config.json` (runtime-spec 1.x) that husk honours: root,
//! process (args, env, cwd, user) and memory/CPU limits. The document is parsed with the
//! `oci-spec` crate, so a config that is not a valid runtime spec (a missing `process.cwd` or
//! `process.user`, a field of the wrong type) is refused with serde's message and its place;
//! the fields husk does not use are parsed and ignored (see docs/containerd.md).

use std::path::Path;

use oci_spec::runtime as spec;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    // The cause is in the message: ttrpc carries only the text to containerd.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not a valid OCI runtime spec: {source}")]
    Parse {
        what: String,
        source: serde_json::Error,
    },
    #[error("the OCI process has no args")]
    NoArgs,
}

/// The container's config: the parsed runtime spec.
#[derive(Debug, Clone)]
pub struct Spec {
    inner: spec::Spec,
}

/// What the guest agent needs of an OCI process.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Process {
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

/// A host directory bound into the container (OCI `mounts` of type bind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// Where a container goes in a Kubernetes pod, from the annotations containerd's CRI plugin
/// puts in its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Not a CRI container (`ctr run`, ...): a VM of its own.
    None,
    /// The pod's sandbox (pause) container: it creates the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox has this id: it runs inside the sandbox's VM.
    Member { sandbox: String },
}

/// CRI's annotation naming the container's kind (`sandbox` or `container`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod's sandbox container.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The path element of kubelet's emptyDir volumes: `.../volumes/kubernetes.io~empty-dir/NAME`.
const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

/// CRI's annotations with the sum of the pod's container limits (kubelet 1.23 and later passes
/// them in the sandbox config; containerd puts them on the sandbox's spec).
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// What a pod's VM gets beyond its containers' memory limits: the guest kernel, husk-init and
/// the page cache of the containers' roots.
pub const POD_VM_HEADROOM_MIB: u32 = 64;

/// CRI's annotation naming the pod's uid (containerd 1.7 and later).
const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
/// CRI's annotation naming the pod's log directory, `/var/log/pods/<ns>_<name>_<uid>`
/// (containerd 1.6 too): where the uid is found when [`SANDBOX_UID`] is missing.
const SANDBOX_LOG_DIR: &str = "io.kubernetes.cri.sandbox-log-directory";

/// A pod container's mounts, sorted out: volumes (below the pod share, or emptyDirs that live
/// in the guest), files copied in, and what is not shared, with the reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodMounts {
    pub volumes: Vec<husk_proto::v1::PodVolume>,
    pub files: Vec<husk_proto::v1::PodFile>,
    pub skipped: Vec<String>,
}

/// One bind mount of the spec: (source, destination, read-only).
type Bind = (std::path::PathBuf, String, bool);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

impl From<&spec::Process> for Process {
    fn from(p: &spec::Process) -> Self {
        Self {
            user: User {
                uid: p.user().uid(),
                gid: p.user().gid(),
                additional_gids: p.user().additional_gids().clone().unwrap_or_default(),
            },
            args: p.args().clone().unwrap_or_default(),
            env: p.env().clone().unwrap_or_default(),
            cwd: p.cwd().display().to_string(),
        }
    }
}

impl Spec {
    pub fn load(bundle: &Path) -> Result<Self, OciError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| OciError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses a config document; `what` names it in errors.
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Self, OciError> {
        serde_json::from_slice(bytes)
            .map(|inner| Self { inner })
            .map_err(|source| OciError::Parse {
                what: what.to_string(),
                source,
            })
    }

    /// The container's process (`None`: the config has none).
    pub fn process(&self) -> Option<Process> {
        self.inner.process().as_ref().map(Process::from)
    }

    /// `root.path` (relative to the bundle, or absolute); empty when there is no root.
    pub fn root_path(&self) -> String {
        self.inner
            .root()
            .as_ref()
            .map(|r| r.path().display().to_string())
            .unwrap_or_default()
    }

    /// Guest memory in MiB from `linux.resources.memory.limit` (rounded up, at least 64, the
    /// smallest VM huskd makes); `None`: huskd's default.
    pub fn memory_mib(&self) -> Option<u32> {
        let limit = self.resources()?.memory().as_ref()?.limit()?;
        if limit <= 0 {
            return None;
        }
        let mib = (limit as u64).div_ceil(1 << 20);
        Some(mib.clamp(64, 262_144) as u32)
    }

    /// vCPUs from the CPU quota (`quota / period`, rounded up, 1..=32); `None`: huskd's default.
    pub fn vcpus(&self) -> Option<u32> {
        let cpu = self.resources()?.cpu().as_ref()?;
        let (quota, period) = (cpu.quota()?, cpu.period()?);
        if quota <= 0 || period == 0 {
            return None;
        }
        Some((quota as u64).div_ceil(period).clamp(1, 32) as u32)
    }

    /// The path of the network namespace the container joins (`linux.namespaces`, type
    /// network, with a path: one that CNI plugins configured); `None` for a new, empty one or
    /// none.
    pub fn network_namespace(&self) -> Option<String> {
        self.inner
            .linux()
            .as_ref()?
            .namespaces()
            .as_ref()?
            .iter()
            .find(|ns| ns.typ() == spec::LinuxNamespaceType::Network)?
            .path()
            .as_ref()
            .map(|p| p.display().to_string())
            .filter(|p| !p.is_empty())
    }

    /// The OCI bind mounts of host directories (`ctr run --mount type=bind,...`, Kubernetes
    /// volumes): each becomes a shared directory of the VM (virtio-fs). What cannot be shared
    /// that way is returned with the reason, for the log: a bind of a single file (the guest
    /// sees directories only), a relative or missing source, a destination the guest cannot
    /// mount at. Kernel file systems (proc, sysfs, tmpfs...) are the guest's own and not listed.
    pub fn bind_mounts(&self) -> (Vec<BindMount>, Vec<String>) {
        let (all, mut skipped) = self.binds();
        let mut binds = Vec::new();
        for (source, destination, read_only) in all {
            if !source.is_dir() {
                skipped.push(format!(
                    "{destination}: {} is not a host directory (only directories are shared)",
                    source.display()
                ));
            } else if !husk_init::shares::valid_guest_path(&destination) {
                skipped.push(format!("{destination}: not a path the guest can mount at"));
            } else {
                binds.push(BindMount {
                    source: source.display().to_string(),
                    destination,
                    read_only,
                });
            }
        }
        (binds, skipped)
    }

    /// Every bind mount with an absolute source; the others with the reason.
    fn binds(&self) -> (Vec<Bind>, Vec<String>) {
        let (mut binds, mut skipped) = (Vec::new(), Vec::new());
        for m in self.inner.mounts().iter().flatten() {
            let options = m.options().clone().unwrap_or_default();
            let is_bind = m.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            if !is_bind {
                continue;
            }
            let destination = m.destination().display().to_string();
            match m.source().as_ref() {
                Some(source) if source.is_absolute() => {
                    binds.push((
                        source.clone(),
                        destination,
                        options.iter().any(|o| o == "ro"),
                    ));
                }
                Some(source) => skipped.push(format!(
                    "{destination}: {} is not an absolute host path",
                    source.display()
                )),
                None => skipped.push(format!("{destination}: a bind mount without a source")),
            }
        }
        (binds, skipped)
    }

    /// The container's host name (`hostname`; CRI sets the pod's on its sandbox), when it is
    /// one huskd takes.
    pub fn hostname(&self) -> Option<String> {
        self.inner
            .hostname()
            .clone()
            .filter(|h| husk_init::hostname::valid_hostname(h))
    }

    /// The pod's uid, from CRI's annotations on its sandbox: the uid itself, or the last
    /// `_`-separated part of the pod's log directory. Only `[A-Za-z0-9-]` is taken.
    pub fn pod_uid(&self) -> Option<String> {
        let annotations = self.inner.annotations().clone().unwrap_or_default();
        let uid = match annotations.get(SANDBOX_UID) {
            Some(uid) => uid.clone(),
            None => {
                let dir = annotations.get(SANDBOX_LOG_DIR)?;
                let base = dir.trim_end_matches('/').rsplit('/').next()?;
                base.rsplit('_').next()?.to_string()
            }
        };
        let valid = !uid.is_empty()
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        valid.then_some(uid)
    }

    /// A pod VM's memory from the sum of its containers' limits (CRI's sandbox annotations)
    /// plus [`POD_VM_HEADROOM_MIB`]; `None` when the pod states no limit (huskd's default).
    pub fn pod_memory_mib(&self) -> Option<u32> {
        let bytes: u64 = self.annotation(SANDBOX_MEMORY)?.parse().ok()?;
        (bytes > 0).then(|| {
            let mib = bytes.div_ceil(1 << 20) + u64::from(POD_VM_HEADROOM_MIB);
            mib.clamp(64, 262_144) as u32
        })
    }

    /// A pod VM's vCPUs from the sum of its containers' CPU limits (quota / period, rounded
    /// up, 1..=32); `None` when the pod states none.
    pub fn pod_vcpus(&self) -> Option<u32> {
        let quota: i64 = self.annotation(SANDBOX_CPU_QUOTA)?.parse().ok()?;
        let period: u64 = self.annotation(SANDBOX_CPU_PERIOD)?.parse().ok()?;
        (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period).clamp(1, 32) as u32)
    }

    fn annotation(&self, key: &str) -> Option<String> {
        self.inner.annotations().as_ref()?.get(key).cloned()
    }

    /// The container's place in a pod (CRI annotations); `own_id` is the container's id.
    pub fn pod_role(&self, own_id: &str) -> PodRole {
        let annotations = self.inner.annotations().clone().unwrap_or_default();
        let sandbox = annotations.get(SANDBOX_ID).filter(|s| !s.is_empty());
        match (annotations.get(CONTAINER_TYPE).map(String::as_str), sandbox) {
            (Some("sandbox"), _) => PodRole::Sandbox,
            (Some("container"), Some(sandbox)) if sandbox != own_id => PodRole::Member {
                sandbox: sandbox.clone(),
            },
            _ => PodRole::None,
        }
    }

    /// The mounts of a container in a pod's VM. With `pod_share` (the pod's kubelet directory,
    /// shared with the VM at boot), whatever lies below it is mounted from the share: live,
    /// both ways (configMap, secret, projected and emptyDir volumes, etc-hosts, the
    /// termination log). Without it, kubelet's emptyDir directories become directories in the
    /// guest shared by the pod's containers (emptyDir's meaning). Small files elsewhere
    /// (CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname) are copied in. The rest cannot
    /// reach a running VM (its shared directories are fixed at boot) and is listed with the
    /// reason; `/dev/shm` is the guest's own.
    pub fn pod_mounts(&self, pod_share: Option<&Path>) -> PodMounts {
        use husk_init::pod::{valid_container_path, MAX_FILES, MAX_FILE_BYTES};
        use husk_proto::v1::{PodFile, PodVolume};
        let (binds, skipped) = self.binds();
        let mut out = PodMounts {
            skipped,
            ..Default::default()
        };
        for (source, destination, read_only) in binds {
            if destination == "/dev/shm" {
                continue;
            }
            if !valid_container_path(&destination) {
                out.skipped
                    .push(format!("{destination}: not a path the guest can mount at"));
                continue;
            }
            let below_share = pod_share
                .and_then(|share| source.strip_prefix(share).ok())
                .map(|rel| rel.display().to_string())
                .filter(|rel| husk_init::pod::valid_relative_path(rel));
            if let Some(pod_path) = below_share {
                out.volumes.push(PodVolume {
                    path: destination,
                    read_only,
                    pod_path,
                    ..Default::default()
                });
            } else if source.is_dir() {
                match empty_dir_name(&source.display().to_string()) {
                    Some(name)
                        if husk_init::pod::valid_name(name, husk_init::pod::MAX_VOLUME_NAME) =>
                    {
                        out.volumes.push(PodVolume {
                            name: name.to_string(),
                            path: destination,
                            read_only,
                            ..Default::default()
                        })
                    }
                    _ => out.skipped.push(format!(
                        "{destination}: {} is a host directory outside the pod's kubelet \
                         directory; it is not shared into a pod's running VM \
                         (docs/containerd.md#pods)",
                        source.display()
                    )),
                }
            } else if out.files.len() < MAX_FILES {
                match read_small_file(&source, MAX_FILE_BYTES) {
                    Ok(content) => out.files.push(PodFile {
                        path: destination,
                        content,
                        read_only,
                    }),
                    Err(why) => out
                        .skipped
                        .push(format!("{destination}: {}: {why}", source.display())),
                }
            } else {
                out.skipped.push(format!(
                    "{destination}: more than {MAX_FILES} files to copy into the container"
                ));
            }
        }
        out
    }

    fn resources(&self) -> Option<&spec::LinuxResources> {
        self.inner.linux().as_ref()?.resources().as_ref()
    }
}

/// The contents of the regular file `path`, if it holds at most `max` bytes (read with that
/// bound, whatever the file claims).
fn read_small_file(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("neither a directory nor a regular file".into());
    }
    let mut content = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut content)
        .map_err(|e| e.to_string())?;
    if content.len() > max {
        return Err(format!(
            "a file of more than {max} bytes is not copied into a pod's VM"
        ));
    }
    Ok(content)
}

/// The volume name of a kubelet emptyDir path (`.../kubernetes.io~empty-dir/NAME`).
fn empty_dir_name(source: &str) -> Option<&str> {
    let mut parts = source.trim_end_matches('/').rsplit('/');
    let name = parts.next()?;
    (parts.next() == Some(EMPTY_DIR) && !name.is_empty()).then_some(name)
}

impl Process {
    /// An exec's process spec, as containerd sends it (JSON in an `Any`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, OciError> {
        let p: spec::Process = serde_json::from_slice(bytes).map_err(|source| OciError::Parse {
            what: "the exec process spec".into(),
            source,
        })?;
        let p = Process::from(&p);
        if p.args.first().is_none_or(String::is_empty) {
            return Err(OciError::NoArgs);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": true, "user": {"uid": 1000, "gid": 100, "additionalGids": [10]},
                    "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b"], "cwd": "/tmp",
                    "capabilities": {"bounding": ["CAP_CHOWN"]}},
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"resources": {"memory": {"limit": 100000000},
                                "cpu": {"quota": 150000, "period": 100000}},
                  "namespaces": [{"type": "pid"}]}
    }"#;

    fn spec(json: &str) -> Spec {
        Spec::from_json(json.as_bytes(), "config.json").unwrap()
    }

    fn annotated(annotations: &str) -> Spec {
        spec(&format!(
            r#"{{"ociVersion": "1.0.2", "process": {{"user": {{"uid": 0, "gid": 0}},
                "args": ["sh"], "cwd": "/"}}, "annotations": {{{annotations}}}}}"#
        ))
    }

    #[test]
    fn cri_annotations_place_a_container_in_its_pod() {
        assert_eq!(annotated("").pod_role("c1"), PodRole::None);
        let sandbox = annotated(
            r#""io.kubernetes.cri.container-type": "sandbox",
               "io.kubernetes.cri.sandbox-id": "s1""#,
        );
        assert_eq!(sandbox.pod_role("s1"), PodRole::Sandbox);
        let member = annotated(
            r#""io.kubernetes.cri.container-type": "container",
               "io.kubernetes.cri.sandbox-id": "s1""#,
        );
        assert_eq!(
            member.pod_role("c1"),
            PodRole::Member {
                sandbox: "s1".into()
            }
        );
        // A container that names itself as its sandbox has no pod VM to join.
        assert_eq!(member.pod_role("s1"), PodRole::None);
    }

    #[test]
    fn pod_mounts_come_from_the_share_the_pod_or_as_copies() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("kubelet/pods/u1");
        let empty = pod.join("volumes/kubernetes.io~empty-dir/cache");
        let config = pod.join("volumes/kubernetes.io~configmap/cfg");
        let host = dir.path().join("data");
        let shm = dir.path().join("shm");
        for d in [&empty, &config, &host, &shm] {
            std::fs::create_dir_all(d).unwrap();
        }
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; husk_init::pod::MAX_FILE_BYTES + 1]).unwrap();
        let bind = |dest: &str, src: &Path, ro: bool| {
            format!(
                r#"{{"destination": "{dest}", "type": "bind", "source": "{}", "options": ["rbind", "{}"]}}"#,
                src.display(),
                if ro { "ro" } else { "rw" }
            )
        };
        let json = format!(
            r#"{{"ociVersion": "1.0.2", "process": {{"user": {{"uid": 0, "gid": 0}},
                "args": ["sh"], "cwd": "/"}}, "mounts": [{}]}}"#,
            [
                bind("/cache", &empty, true),
                bind("/etc/cfg", &config, true),
                bind("/data", &host, false),
                bind("/dev/shm", &shm, false),
                bind("/etc/hosts", &hosts, false),
                bind("/big", &big, false),
            ]
            .join(",")
        );
        let spec = spec(&json);
        // Without a pod share: the emptyDir lives in the guest; the configMap cannot be shared.
        let m = spec.pod_mounts(None);
        assert_eq!(
            m.volumes,
            vec![husk_proto::v1::PodVolume {
                name: "cache".into(),
                path: "/cache".into(),
                read_only: true,
                ..Default::default()
            }]
        );
        assert_eq!(m.files.len(), 1);
        assert_eq!(m.files[0].path, "/etc/hosts");
        assert_eq!(m.files[0].content, b"127.0.0.1 localhost\n");
        let skipped: Vec<&str> = m
            .skipped
            .iter()
            .map(|s| &s[..s.find(':').unwrap()])
            .collect();
        assert_eq!(skipped, ["/etc/cfg", "/data", "/big"], "{:?}", m.skipped);
        // With the pod's kubelet directory shared, both volumes come from the share.
        let m = spec.pod_mounts(Some(&pod));
        let shared: Vec<(&str, &str)> = m
            .volumes
            .iter()
            .map(|v| (v.path.as_str(), v.pod_path.as_str()))
            .collect();
        assert_eq!(
            shared,
            [
                ("/cache", "volumes/kubernetes.io~empty-dir/cache"),
                ("/etc/cfg", "volumes/kubernetes.io~configmap/cfg")
            ]
        );
        assert_eq!(empty_dir_name("/x/kubernetes.io~empty-dir/"), None);
        assert_eq!(empty_dir_name("/x/kubernetes.io~configmap/a"), None);
    }

    #[test]
    fn a_pod_vm_is_sized_by_its_containers_limits() {
        let pod = annotated(
            r#""io.kubernetes.cri.sandbox-memory": "209715200",
               "io.kubernetes.cri.sandbox-cpu-quota": "150000",
               "io.kubernetes.cri.sandbox-cpu-period": "100000""#,
        );
        assert_eq!(pod.pod_memory_mib(), Some(200 + POD_VM_HEADROOM_MIB));
        assert_eq!(pod.pod_vcpus(), Some(2));
        let unlimited = annotated(
            r#""io.kubernetes.cri.sandbox-memory": "0",
               "io.kubernetes.cri.sandbox-cpu-quota": "-1",
               "io.kubernetes.cri.sandbox-cpu-period": "100000""#,
        );
        assert_eq!(unlimited.pod_memory_mib(), None);
        assert_eq!(unlimited.pod_vcpus(), None);
        assert_eq!(annotated("").pod_memory_mib(), None);
    }

    #[test]
    fn the_pod_uid_comes_from_its_annotation_or_its_log_directory() {
        let uid = annotated(r#""io.kubernetes.cri.sandbox-uid": "7d3c-11""#);
        assert_eq!(uid.pod_uid().as_deref(), Some("7d3c-11"));
        let log = annotated(
            r#""io.kubernetes.cri.sandbox-log-directory": "/var/log/pods/default_web_5a2b-9f""#,
        );
        assert_eq!(log.pod_uid().as_deref(), Some("5a2b-9f"));
        assert_eq!(
            annotated(r#""io.kubernetes.cri.sandbox-uid": "../x""#).pod_uid(),
            None
        );
        assert_eq!(annotated("").pod_uid(), None);
    }

    #[test]
    fn host_directory_binds_become_shared_directories_and_the_rest_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "").unwrap();
        let json = format!(
            r#"{{"ociVersion": "1.0.2", "process": {{"user": {{"uid": 0, "gid": 0}},
                "args": ["sh"], "cwd": "/"}}, "root": {{"path": "rootfs"}},
                "mounts": [
                  {{"destination": "/proc", "type": "proc", "source": "proc"}},
                  {{"destination": "/data", "type": "bind", "source": "{d}",
                    "options": ["rbind", "rw"]}},
                  {{"destination": "/conf", "source": "{d}", "options": ["bind", "ro"]}},
                  {{"destination": "/etc/hosts", "type": "bind", "source": "{f}",
                    "options": ["rbind", "ro"]}},
                  {{"destination": "/bad path", "type": "bind", "source": "{d}"}}
                ]}}"#,
            d = dir.path().display(),
            f = file.display()
        );
        let (binds, skipped) = spec(&json).bind_mounts();
        let source = dir.path().display().to_string();
        assert_eq!(
            binds,
            [
                BindMount {
                    source: source.clone(),
                    destination: "/data".into(),
                    read_only: false
                },
                BindMount {
                    source,
                    destination: "/conf".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("/etc/hosts"), "{skipped:?}");
    }

    #[test]
    fn a_containerd_config_is_read() {
        let spec = spec(CONFIG);
        let p = spec.process().unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.env, ["PATH=/bin", "A=b"]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!((p.user.uid, p.user.gid), (1000, 100));
        assert_eq!(p.user.additional_gids, [10]);
        assert_eq!(spec.root_path(), "rootfs");
        assert_eq!(spec.memory_mib(), Some(96)); // 95.4 MiB rounded up
        assert_eq!(spec.vcpus(), Some(2)); // 1.5 CPUs rounded up
    }

    /// The shape of containerd 1.6's default spec (`ctr run`, oci/spec.go
    /// populateDefaultUnixSpec) with an `ctr run -t --memory-limit` on top.
    const CTR_DEFAULT: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": true, "consoleSize": {"height": 33, "width": 111},
            "user": {"uid": 0, "gid": 0}, "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
                             "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
                             "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                             "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"],
                "effective": ["CAP_CHOWN"], "permitted": ["CAP_CHOWN"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}],
                          "memory": {"limit": 536870912}},
            "cgroupsPath": "/default/web",
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/sys"]
        }
    }"#;

    #[test]
    fn containerds_default_spec_is_read_and_its_unused_parts_ignored() {
        let spec = spec(CTR_DEFAULT);
        let p = spec.process().unwrap();
        assert_eq!(
            (p.args.as_slice(), p.cwd.as_str()),
            (&["sh".to_string()][..], "/")
        );
        assert_eq!((p.user.uid, p.user.gid), (0, 0));
        assert!(p.user.additional_gids.is_empty());
        assert_eq!(spec.root_path(), "rootfs");
        assert_eq!((spec.memory_mib(), spec.vcpus()), (Some(512), None));
        assert_eq!(spec.network_namespace(), None, "a new, empty namespace");
    }

    #[test]
    fn a_network_namespace_with_a_path_is_one_to_join() {
        let with_ns = spec(
            r#"{"linux": {"namespaces": [{"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-42"}]}}"#,
        );
        assert_eq!(
            with_ns.network_namespace().as_deref(),
            Some("/var/run/netns/cni-42")
        );
        assert_eq!(spec(CONFIG).network_namespace(), None, "no network entry");
    }

    #[test]
    fn a_bundle_config_is_loaded_and_a_missing_one_named() {
        let dir = std::env::temp_dir().join(format!("husk-shim-oci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        assert_eq!(Spec::load(&dir).unwrap().vcpus(), Some(2));
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let err = Spec::load(&dir).unwrap_err();
        assert!(matches!(err, OciError::Read { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_are_clamped_or_absent() {
        let spec =
            spec(r#"{"linux": {"resources": {"memory": {"limit": 1000}, "cpu": {"quota": -1}}}}"#);
        assert_eq!(spec.memory_mib(), Some(64));
        assert_eq!(spec.vcpus(), None);
        let bare = self::spec("{}");
        assert_eq!(bare.memory_mib(), None);
        assert_eq!(bare.vcpus(), None);
        assert!(bare.process().is_none());
        assert_eq!(bare.root_path(), "");
        let huge = self::spec(
            r#"{"linux": {"resources": {"memory": {"limit": 9000000000000},
                                        "cpu": {"quota": 9900000, "period": 100000}}}}"#,
        );
        assert_eq!((huge.memory_mib(), huge.vcpus()), (Some(262_144), Some(32)));
    }

    #[test]
    fn configs_that_are_not_runtime_specs_are_refused_with_the_reason() {
        for (bad, reason) in [
            ("not json", "expected"),
            (
                r#"{"process": {"args": ["sh"], "user": {"uid": 0}}}"#,
                "cwd",
            ),
            (r#"{"process": {"args": ["sh"], "cwd": "/"}}"#, "user"),
            (
                r#"{"linux": {"resources": {"memory": {"limit": "lots"}}}}"#,
                "invalid type",
            ),
        ] {
            let err = Spec::from_json(bad.as_bytes(), "/b/config.json").unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, OciError::Parse { .. }), "{bad}: {text}");
            assert!(
                text.contains("/b/config.json") && text.contains(reason),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn exec_specs_need_args() {
        let user = r#""user": {"uid": 0, "gid": 0}, "cwd": "/""#;
        assert!(matches!(
            Process::from_json(format!(r#"{{"args": [], {user}}}"#).as_bytes()),
            Err(OciError::NoArgs)
        ));
        assert!(matches!(
            Process::from_json(format!(r#"{{"args": [""], {user}}}"#).as_bytes()),
            Err(OciError::NoArgs)
        ));
        assert!(matches!(
            Process::from_json(format!("{{{user}}}").as_bytes()),
            Err(OciError::NoArgs)
        ));
        assert!(Process::from_json(b"not json").is_err());
        let p = Process::from_json(
            br#"{"args": ["ls"], "cwd": "/", "user": {"uid": 1000, "gid": 1000},
                 "env": ["A=1"], "terminal": false}"#,
        )
        .unwrap();
        assert_eq!(p.args, ["ls"]);
        assert_eq!((p.user.uid, p.cwd.as_str()), (1000, "/"));
        assert_eq!(p.env, ["A=1"]);
    }
}
