//! `husk template create|ls|rm`: sandboxes booted once and cloned by `husk create --template`
//! (huskd's CreateTemplate, ListTemplates, DeleteTemplate). See docs/templates.md.

use clap::{Args, Subcommand};
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{
    CreateTemplateRequest, DeleteTemplateRequest, ListTemplatesRequest, Template, VmSpec,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::image_store::human_size;
use crate::opts::CreateArgs;
use crate::remote::RemoteError;

/// `husk template ...`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateVerb,
}

#[derive(Debug, Subcommand)]
pub enum TemplateVerb {
    /// Boot a sandbox once and keep its snapshot as template NAME (VM options as `husk
    /// create`, no CMD); waits until it is ready
    Create(Box<TemplateCreateArgs>),
    /// List templates
    Ls {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove templates (their files stay while VMs cloned from them exist)
    Rm {
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct TemplateCreateArgs {
    /// The template's name
    #[arg(value_name = "NAME")]
    pub template_name: String,
    /// Rebuild it if it exists (clones of the old build keep it)
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub vm: CreateArgs,
}

/// Runs `husk template ...`.
pub async fn run(
    client: &mut HuskClient<Channel>,
    args: &TemplateArgs,
) -> Result<i32, RemoteError> {
    match &args.command {
        TemplateVerb::Create(create) => {
            let spec = template_spec(&create.vm)?;
            let template = client
                .create_template(CreateTemplateRequest {
                    name: create.template_name.clone(),
                    spec: Some(spec),
                    replace: create.replace,
                })
                .await?
                .into_inner();
            println!(
                "{}: ready in {:.1} s ({} of memory)",
                template.name,
                template.build_ms as f64 / 1000.0,
                human_size(template.memory_written)
            );
            Ok(0)
        }
        TemplateVerb::Ls { json } => {
            let mut templates = client
                .list_templates(ListTemplatesRequest {})
                .await?
                .into_inner()
                .templates;
            templates.sort_by(|a, b| a.name.cmp(&b.name));
            if *json {
                println!("{}", to_json(&templates));
            } else {
                print!("{}", to_table(&templates));
            }
            Ok(0)
        }
        TemplateVerb::Rm { names } => {
            for name in names {
                client
                    .delete_template(DeleteTemplateRequest { name: name.clone() })
                    .await?;
                println!("{name}");
            }
            Ok(0)
        }
    }
}

/// The spec of `husk template create`: `husk create`'s, which must not name a command or ask
/// for a start.
fn template_spec(args: &CreateArgs) -> Result<VmSpec, RemoteError> {
    if !args.command.is_empty() {
        return Err(RemoteError::Usage(
            "husk template create: a template is a sandbox: no CMD (run commands in its clones \
             with husk exec)"
                .into(),
        ));
    }
    if args.start || args.name.is_some() || args.template.is_some() {
        return Err(RemoteError::Usage(
            "husk template create: --start, --name and --template do not apply (clones are \
             started and named by husk create --template)"
                .into(),
        ));
    }
    let (mut spec, _) = crate::remote::create_spec(args);
    crate::rate_limit_cmd::apply_to_spec(&mut spec, &args.limits)?;
    Ok(spec)
}

fn state_text(state: i32) -> String {
    use husk_proto::v1::template::State;
    match State::try_from(state) {
        Ok(State::Building) => "building",
        Ok(State::Ready) => "ready",
        Ok(State::Stale) => "stale",
        Ok(State::Failed) => "failed",
        _ => "unknown",
    }
    .to_string()
}

fn to_table(templates: &[Template]) -> String {
    let rows: Vec<Vec<String>> = templates
        .iter()
        .map(|t| {
            let spec = t.spec.clone().unwrap_or_default();
            vec![
                t.name.clone(),
                state_text(t.state),
                t.clones.to_string(),
                format!("{}x{} MiB", spec.vcpus.max(1), spec.memory_mib),
                human_size(t.memory_written),
                format!("{:.1} s", t.build_ms as f64 / 1000.0),
                t.reason.clone(),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "NAME", "STATE", "CLONES", "SHAPE", "SNAPSHOT", "BUILD", "REASON",
        ],
        &rows,
    )
}

#[derive(Serialize)]
struct TemplateJson<'a> {
    name: &'a str,
    state: String,
    reason: &'a str,
    clones: u32,
    vcpus: u32,
    memory_mib: u32,
    memory_bytes: u64,
    memory_written: u64,
    build_ms: u64,
    created_unix_ms: i64,
    build: &'a str,
    inputs: Vec<&'a str>,
}

fn to_json(templates: &[Template]) -> String {
    let items: Vec<TemplateJson<'_>> = templates
        .iter()
        .map(|t| {
            let (vcpus, memory_mib) = t.spec.as_ref().map_or((0, 0), |s| (s.vcpus, s.memory_mib));
            TemplateJson {
                name: &t.name,
                state: state_text(t.state),
                reason: &t.reason,
                clones: t.clones,
                vcpus,
                memory_mib,
                memory_bytes: t.memory_bytes,
                memory_written: t.memory_written,
                build_ms: t.build_ms,
                created_unix_ms: t.created_unix_ms,
                build: &t.build,
                inputs: t.inputs.iter().map(|i| i.path.as_str()).collect(),
            }
        })
        .collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::{Cli, Verb};
    use clap::Parser;

    fn parse(args: &[&str]) -> TemplateArgs {
        let cli = Cli::try_parse_from(args).unwrap();
        let Verb::Template(t) = cli.command else {
            panic!("not a template verb");
        };
        t
    }

    #[test]
    fn template_create_takes_husk_create_options_but_no_command() {
        let t = parse(&[
            "husk",
            "template",
            "create",
            "py",
            "--memory",
            "512",
            "--net",
            "--replace",
        ]);
        let TemplateVerb::Create(create) = &t.command else {
            panic!("not create");
        };
        assert_eq!(create.template_name, "py");
        assert!(create.replace);
        let spec = template_spec(&create.vm).unwrap();
        assert_eq!(spec.memory_mib, 512);
        assert_eq!(spec.network.unwrap().mode, 1);
        let t = parse(&["husk", "template", "create", "py", "--", "sleep", "1"]);
        let TemplateVerb::Create(create) = &t.command else {
            panic!("not create");
        };
        assert!(template_spec(&create.vm).is_err());
    }

    #[test]
    fn the_table_shows_state_clones_and_shape() {
        let t = Template {
            name: "py".into(),
            state: husk_proto::v1::template::State::Stale as i32,
            reason: "/k changed".into(),
            clones: 3,
            spec: Some(VmSpec {
                vcpus: 2,
                memory_mib: 256,
                ..Default::default()
            }),
            memory_written: 30 << 20,
            build_ms: 5200,
            ..Default::default()
        };
        let table = to_table(std::slice::from_ref(&t));
        assert!(table.contains("py"), "{table}");
        assert!(table.contains("stale"), "{table}");
        assert!(table.contains("2x256 MiB"), "{table}");
        assert!(table.contains("/k changed"), "{table}");
        let json = to_json(&[t]);
        assert!(json.contains("\"clones\":3"), "{json}");
    }
}
