//! The part of an OCI runtime bundle's `config.json` (runtime-spec 1.x) that husk honours:
//! root, process (args, env, cwd, user, terminal) and memory/CPU limits. Everything else is
//! ignored (see docs/containerd.md).

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not a valid OCI document: {source}")]
    Parse {
        what: String,
        source: serde_json::Error,
    },
    #[error("the OCI process has no args")]
    NoArgs,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub root: Option<Root>,
    #[serde(default)]
    pub linux: Option<Linux>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Root {
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Process {
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, rename = "additionalGids")]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Linux {
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Cpu {
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
}

impl Spec {
    pub fn load(bundle: &Path) -> Result<Self, OciError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|source| OciError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| OciError::Parse {
            what: path.display().to_string(),
            source,
        })
    }

    /// Guest memory in MiB from `linux.resources.memory.limit` (rounded up, at least 64, the
    /// smallest VM huskd makes); `None`: huskd's default.
    pub fn memory_mib(&self) -> Option<u32> {
        let limit = self.resources()?.memory.as_ref()?.limit?;
        if limit <= 0 {
            return None;
        }
        let mib = (limit as u64).div_ceil(1 << 20);
        Some(mib.clamp(64, 262_144) as u32)
    }

    /// vCPUs from the CPU quota (`quota / period`, rounded up, 1..=32); `None`: huskd's default.
    pub fn vcpus(&self) -> Option<u32> {
        let cpu = self.resources()?.cpu.as_ref()?;
        let (quota, period) = (cpu.quota?, cpu.period?);
        if quota <= 0 || period == 0 {
            return None;
        }
        Some((quota as u64).div_ceil(period).clamp(1, 32) as u32)
    }

    fn resources(&self) -> Option<&Resources> {
        self.linux.as_ref()?.resources.as_ref()
    }
}

impl Process {
    /// An exec's process spec, as containerd sends it (JSON in an `Any`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, OciError> {
        let p: Process = serde_json::from_slice(bytes).map_err(|source| OciError::Parse {
            what: "the exec process spec".into(),
            source,
        })?;
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

    #[test]
    fn a_containerd_config_is_read() {
        let spec: Spec = serde_json::from_str(CONFIG).unwrap();
        let p = spec.process.as_ref().unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.env, ["PATH=/bin", "A=b"]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!((p.user.uid, p.user.gid), (1000, 100));
        assert_eq!(p.user.additional_gids, [10]);
        assert_eq!(spec.root.as_ref().unwrap().path, "rootfs");
        assert_eq!(spec.memory_mib(), Some(96)); // 95.4 MiB rounded up
        assert_eq!(spec.vcpus(), Some(2)); // 1.5 CPUs rounded up
    }

    #[test]
    fn limits_are_clamped_or_absent() {
        let spec: Spec = serde_json::from_str(
            r#"{"linux": {"resources": {"memory": {"limit": 1000}, "cpu": {"quota": -1}}}}"#,
        )
        .unwrap();
        assert_eq!(spec.memory_mib(), Some(64));
        assert_eq!(spec.vcpus(), None);
        assert_eq!(Spec::default().memory_mib(), None);
    }

    #[test]
    fn exec_specs_need_args() {
        assert!(matches!(
            Process::from_json(br#"{"args": []}"#),
            Err(OciError::NoArgs)
        ));
        assert!(Process::from_json(b"not json").is_err());
        let p = Process::from_json(br#"{"args": ["ls"], "cwd": "/"}"#).unwrap();
        assert_eq!(p.args, ["ls"]);
    }
}
