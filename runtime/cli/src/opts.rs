//! A small option parser for the daemon verbs: `--flag`, `--flag VALUE`, `--flag=VALUE`, short
//! aliases, positionals, and a command after `--`.

/// One option a verb accepts.
pub struct Opt {
    pub names: &'static [&'static str],
    pub takes_value: bool,
}

pub const fn flag(names: &'static [&'static str]) -> Opt {
    Opt {
        names,
        takes_value: false,
    }
}

pub const fn value(names: &'static [&'static str]) -> Opt {
    Opt {
        names,
        takes_value: true,
    }
}

/// The parsed arguments of one verb.
#[derive(Debug, Default)]
pub struct Parsed {
    /// (canonical name, value) in command-line order.
    pub options: Vec<(&'static str, Option<String>)>,
    pub positional: Vec<String>,
    /// Everything after `--`, or after the first positional when `command_after_positional`.
    pub command: Vec<String>,
}

impl Parsed {
    pub fn has(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }

    /// The last value given for `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value given for `name`, in order.
    pub fn values(&self, name: &str) -> Vec<String> {
        self.options
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }

    /// A number option within `range`, or `default`.
    pub fn number(
        &self,
        name: &str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<u32, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v.parse().ok().filter(|n| range.contains(n)).ok_or_else(|| {
                format!(
                    "{name} {v:?}: not a number in {}..={}",
                    range.start(),
                    range.end()
                )
            }),
        }
    }

    /// `KEY=VALUE` pairs of `name`.
    pub fn pairs(&self, name: &str) -> Result<Vec<(String, String)>, String> {
        self.values(name)
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(format!("{name} {kv:?} is not KEY=VALUE")),
            })
            .collect()
    }
}

/// Parses `args` against `opts`. With `max_positional`, the arguments after that many
/// positionals are the command (docker's `exec VM CMD ARGS...`).
pub fn parse(
    args: &[String],
    opts: &[Opt],
    max_positional: Option<usize>,
) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            out.command = it.by_ref().cloned().collect();
            break;
        }
        if arg.starts_with('-') && arg.len() > 1 {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            // Combined short flags: -it == -i -t.
            if !name.starts_with("--") && name.len() > 2 && inline.is_none() {
                for c in name[1..].chars() {
                    let short = format!("-{c}");
                    let opt =
                        find(opts, &short).ok_or_else(|| format!("unknown option {short}"))?;
                    if opt.takes_value {
                        return Err(format!("{short} needs a value and cannot be combined"));
                    }
                    out.options.push((opt.names[0], None));
                }
                continue;
            }
            let opt = find(opts, name).ok_or_else(|| format!("unknown option {name}"))?;
            let value = if opt.takes_value {
                Some(
                    inline
                        .or_else(|| it.next().cloned())
                        .ok_or_else(|| format!("{name} needs a value"))?,
                )
            } else if inline.is_some() {
                return Err(format!("{name} takes no value"));
            } else {
                None
            };
            out.options.push((opt.names[0], value));
            continue;
        }
        out.positional.push(arg.clone());
        if max_positional.is_some_and(|max| out.positional.len() == max) {
            out.command = it.by_ref().cloned().collect();
            if out.command.first().is_some_and(|c| c == "--") {
                out.command.remove(0);
            }
            break;
        }
    }
    Ok(out)
}

fn find<'a>(opts: &'a [Opt], name: &str) -> Option<&'a Opt> {
    opts.iter().find(|o| o.names.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    const OPTS: &[Opt] = &[
        flag(&["--interactive", "-i"]),
        flag(&["--tty", "-t"]),
        value(&["--env", "-e"]),
        value(&["--cpus"]),
    ];

    #[test]
    fn values_flags_positionals_and_the_command() {
        let p = parse(
            &s(&["-it", "--env=A=1", "-e", "B=2", "vm1", "sh", "-c", "x"]),
            OPTS,
            Some(1),
        )
        .unwrap();
        assert!(p.has("--interactive") && p.has("--tty"));
        assert_eq!(
            p.pairs("--env").unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(p.positional, vec!["vm1"]);
        assert_eq!(p.command, vec!["sh", "-c", "x"]);
        let p = parse(&s(&["vm1", "--", "ls", "-l"]), OPTS, Some(1)).unwrap();
        assert_eq!(p.command, vec!["ls", "-l"]);
        let p = parse(&s(&["--cpus", "2", "--", "true"]), OPTS, None).unwrap();
        assert_eq!(p.number("--cpus", 1, 1..=32).unwrap(), 2);
        assert_eq!(p.command, vec!["true"]);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse(&s(&["--nope"]), OPTS, None)
            .unwrap_err()
            .contains("--nope"));
        assert!(parse(&s(&["--cpus"]), OPTS, None)
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&s(&["-ie"]), OPTS, None).unwrap_err().contains("-e"));
        assert!(parse(&s(&["--tty=1"]), OPTS, None)
            .unwrap_err()
            .contains("takes no value"));
        let p = parse(&s(&["--cpus", "99", "-e", "novalue"]), OPTS, None).unwrap();
        assert!(p.number("--cpus", 1, 1..=32).is_err());
        assert!(p.pairs("--env").is_err());
    }
}
