//! `husk memory VM [--target SIZE] [--json]`: a running VM's memory (guest RAM, VMM RSS, the
//! balloon and the guest's own statistics), and its balloon's target (huskd's SetMemoryTarget
//! and GetVmMemory). See docs/balloon.md.

use clap::Args;
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{GetVmMemoryRequest, SetMemoryTargetRequest, VmMemory};
use tonic::transport::Channel;

use crate::image_store::{human_size, parse_size};
use crate::remote::RemoteError;

/// `husk memory ...`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Ask the guest to give this much of its memory back to the host through its balloon
    /// (e.g. 64M, 1G; 0 gives it all back to the guest). The guest inflates in its own time:
    /// run `husk memory VM` again to see it
    #[arg(long, value_name = "SIZE", value_parser = parse_target)]
    pub target: Option<u64>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// A target: 0, or a size in whole MiB.
fn parse_target(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    let bytes = parse_size(text)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("{text:?} is not a whole number of MiB"));
    }
    Ok(bytes >> 20)
}

/// Runs `husk memory`: sets the target first when asked, then prints the VM's memory.
pub async fn run(client: &mut HuskClient<Channel>, args: &MemoryArgs) -> Result<i32, RemoteError> {
    let memory = match args.target {
        Some(target_mib) => client
            .set_memory_target(SetMemoryTargetRequest {
                vm: args.vm.clone(),
                target_mib,
            })
            .await?
            .into_inner(),
        None => client
            .get_vm_memory(GetVmMemoryRequest {
                vm: args.vm.clone(),
            })
            .await?
            .into_inner(),
    };
    if args.json {
        println!("{}", to_json(&memory));
    } else {
        print!("{}", to_text(&memory));
    }
    Ok(0)
}

fn to_json(m: &VmMemory) -> serde_json::Value {
    let balloon = m.balloon.then(|| {
        serde_json::json!({
            "target_mib": m.balloon_target_mib,
            "actual_mib": m.balloon_actual_mib,
            "free_page_reporting": m.free_page_reporting,
            "reported_bytes": m.reported_bytes,
        })
    });
    let stats: serde_json::Map<String, serde_json::Value> = m
        .guest_stats
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    serde_json::json!({
        "memory_mib": m.memory_mib,
        "vmm_rss_bytes": m.vmm_rss_bytes,
        "balloon": balloon,
        "guest_stats": stats,
        "stats_age_ms": m.stats_age_ms,
    })
}

fn to_text(m: &VmMemory) -> String {
    let mut out = format!(
        "guest memory    {}\nVMM resident    {}\n",
        human_size(m.memory_mib << 20),
        human_size(m.vmm_rss_bytes)
    );
    if !m.balloon {
        out.push_str("balloon         none\n");
        return out;
    }
    out.push_str(&format!(
        "balloon         {} of a {} target\n",
        human_size(m.balloon_actual_mib << 20),
        human_size(m.balloon_target_mib << 20)
    ));
    let reporting = if m.free_page_reporting {
        format!("on, {} given back", human_size(m.reported_bytes))
    } else {
        "off".to_string()
    };
    out.push_str(&format!("free reporting  {reporting}\n"));
    for (name, label) in [
        ("total_memory", "guest total"),
        ("available_memory", "guest available"),
        ("free_memory", "guest free"),
        ("disk_caches", "guest caches"),
    ] {
        if let Some(v) = m.guest_stats.get(name) {
            out.push_str(&format!("{label:<16}{}\n", human_size(*v)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_zero_or_whole_mib() {
        assert_eq!(parse_target("0"), Ok(0));
        assert_eq!(parse_target("64M"), Ok(64));
        assert_eq!(parse_target("1G"), Ok(1024));
        assert!(parse_target("1536K").is_err());
        assert!(parse_target("lots").is_err());
    }

    #[test]
    fn the_text_view_names_the_balloon_or_its_absence() {
        let mut m = VmMemory {
            memory_mib: 256,
            vmm_rss_bytes: 40 << 20,
            ..Default::default()
        };
        assert!(to_text(&m).contains("balloon         none"));
        m.balloon = true;
        m.balloon_target_mib = 64;
        m.balloon_actual_mib = 32;
        m.free_page_reporting = true;
        m.guest_stats.insert("free_memory".into(), 100 << 20);
        let text = to_text(&m);
        assert!(text.contains("32 MiB of a 64 MiB target"), "{text}");
        assert!(text.contains("guest free      100 MiB"), "{text}");
        let json = to_json(&m);
        assert_eq!(json["balloon"]["actual_mib"], 32);
        assert_eq!(json["guest_stats"]["free_memory"], 100u64 << 20);
    }
}
