//! `husk run --image oci-dir:PATH|oci-archive:PATH`: the image's base (built once per image
//! manifest, cached in `$HUSK_HOME/oci-bases`, see `husk_host::oci_image`) becomes `--rootfs`
//! (under the usual throw-away overlay), and the image's config fills in what the command line
//! left out: the command (Entrypoint + Cmd), the environment (the image's first, `-e` on top)
//! and the working directory.

use std::io::Write;
use std::path::Path;

use husk_host::oci_image::{prepare, ImageSource, RunConfig};

use crate::quick_launch::RunError;
use crate::run_args::RunArgs;

/// The cache of OCI image bases under `home`.
pub fn cache_dir(home: &Path) -> std::path::PathBuf {
    home.join("oci-bases")
}

/// `args` with the image's base as its root and the image's defaults applied.
pub fn apply(args: &RunArgs, source: &ImageSource, home: &Path) -> Result<RunArgs, RunError> {
    let mut stderr = std::io::stderr();
    let base = prepare(source, &cache_dir(home), &mut |line| {
        let _ = writeln!(stderr, "husk: {source}: {line}");
    })?;
    if base.built {
        let _ = writeln!(stderr, "husk: {source}: base {}", base.image.display());
    }
    let mut out = args.clone();
    out.image = None;
    out.rootfs = Some(base.image);
    out.rootfs_format = Some(husk_host::vmm_args::DiskFormat::Raw);
    with_config(&mut out, &base.config)?;
    Ok(out)
}

/// Fills in the command, environment and working directory from the image's config.
fn with_config(args: &mut RunArgs, config: &RunConfig) -> Result<(), RunError> {
    if args.command.is_empty() {
        args.command = config
            .entrypoint
            .iter()
            .chain(&config.cmd)
            .cloned()
            .collect();
        if args.command.is_empty() {
            return Err(RunError::ImageNoCommand);
        }
    }
    let mut env = config.env.clone();
    env.extend(args.env.iter().cloned());
    args.env = env;
    if args.workdir.is_none() && !config.workdir.is_empty() {
        args.workdir = Some(config.workdir.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(line: &[&str]) -> RunArgs {
        Cli::try_parse_from(std::iter::once("run").chain(line.iter().copied()))
            .unwrap()
            .run
    }

    #[test]
    fn the_image_config_fills_in_what_the_command_line_left_out() {
        let config = RunConfig {
            entrypoint: vec!["/bin/tool".into()],
            cmd: vec!["--flag".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            workdir: "/srv".into(),
        };
        let mut a = args(&["--image", "oci-dir:/i", "-e", "A=user"]);
        with_config(&mut a, &config).unwrap();
        assert_eq!(a.command, ["/bin/tool", "--flag"]);
        // The user's entry comes last, so it wins in the guest.
        assert_eq!(a.env, ["PATH=/bin", "A=image", "A=user"]);
        assert_eq!(a.workdir.as_deref(), Some("/srv"));
        let mut a = args(&[
            "--image",
            "oci-dir:/i",
            "-w",
            "/tmp",
            "--",
            "sh",
            "-c",
            "true",
        ]);
        with_config(&mut a, &config).unwrap();
        assert_eq!(a.command, ["sh", "-c", "true"]);
        assert_eq!(a.workdir.as_deref(), Some("/tmp"));
        let mut a = args(&["--image", "oci-dir:/i"]);
        assert!(matches!(
            with_config(&mut a, &RunConfig::default()),
            Err(RunError::ImageNoCommand)
        ));
    }

    #[test]
    fn an_image_excludes_a_rootfs_and_stands_for_the_command() {
        let cli = Cli::try_parse_from(["run", "--image", "oci-dir:/i", "--rootfs", "/r"]);
        assert!(cli.is_err());
        assert!(args(&["--image", "oci-archive:/i.tar"]).check().is_ok());
        assert!(Cli::try_parse_from(["run", "--image", "docker://x"]).is_err());
    }
}
