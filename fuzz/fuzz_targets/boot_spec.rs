//! The boot spec (`husk.spec=` on the guest kernel command line) as husk-init reads it, and
//! specs built from the input as the host writes them. Decoding must never panic, and whatever
//! the host can encode, the guest decodes back to the same spec.

#![no_main]

use husk_init::spec::{BootSpec, MAX_ENCODED_LEN, PARAM};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // The guest side: a kernel command line.
        let cmdline = String::from_utf8_lossy(data);
        let decoded = BootSpec::from_cmdline(&cmdline);
        let param = format!("console=ttyS0 {PARAM}{cmdline} quiet");
        let _ = BootSpec::from_cmdline(&param);
        if let Some(Ok(spec)) = decoded {
            assert!(!spec.argv.is_empty() || (spec.env.is_empty() && spec.cwd.is_none()));
            if let Ok(encoded) = spec.encode() {
                assert_eq!(BootSpec::decode(&encoded).as_ref(), Ok(&spec));
            }
        }
        return;
    }
    // The host side: fields split on 0xff, a leading tag byte says which field.
    let mut spec = BootSpec::default();
    for field in data.split(|&b| b == 0xff) {
        match field.split_first() {
            Some((b'e', v)) => spec.env.push(v.to_vec()),
            Some((b'w', v)) => spec.cwd = Some(v.to_vec()),
            Some((_, v)) => spec.argv.push(v.to_vec()),
            None => {}
        }
    }
    if let Ok(encoded) = spec.encode() {
        assert!(encoded.len() <= MAX_ENCODED_LEN);
        assert!(encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let line = format!("root=/dev/vda {PARAM}{encoded} rw");
        assert_eq!(BootSpec::from_cmdline(&line), Some(Ok(spec)));
    }
});
