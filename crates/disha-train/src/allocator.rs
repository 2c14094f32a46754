//! glibc's allocator set up for training: freed tensor buffers stay in the process and are
//! reused, instead of going back to the kernel and being faulted in again on the next step.
//!
//! A training step on Flex allocates and frees the same large buffers every step (activations,
//! gradients, matmul outputs). glibc serves blocks above its dynamic mmap threshold with fresh
//! `mmap`s and trims the heap top above its trim threshold, so each step faults its pages in
//! again; in a virtual machine every fault is a VM exit. With the mmap threshold at its maximum
//! (32 MiB) and a trim threshold of 128 MiB, blocks up to 32 MiB are recycled from the heap: the
//! `llama512` Bone step of `cargo xtask bench compare` measured 0.20–0.27 s with glibc's
//! defaults and 0.17–0.21 s with these, in interleaved runs, with the same peak RSS (see the
//! benchmarks chapter of the docs).
//!
//! The settings are glibc tunables, read once when a process starts, so [`tune_and_reexec`]
//! starts the program again with `GLIBC_TUNABLES` set (`exec`: the same process id, arguments and
//! environment otherwise). It does nothing where the user set `GLIBC_TUNABLES` themselves, where
//! [`TUNING_ENV`] is set (any value: `DISHA_MALLOC_TUNING=off` turns it off; the re-executed
//! program has it set, so it never loops), or off glibc Linux.

/// Set to any value to keep glibc's default allocator settings.
pub const TUNING_ENV: &str = "DISHA_MALLOC_TUNING";

/// The glibc tunables the training binaries run with.
pub const TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728";

/// Restarts the current program with [`TUNABLES`] unless the user chose otherwise (see the
/// module documentation). Call it first thing in `main`, before reading input: it returns only
/// when nothing was done or the restart failed (then the program goes on with glibc's
/// defaults).
pub fn tune_and_reexec() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        if std::env::var_os("GLIBC_TUNABLES").is_some() || std::env::var_os(TUNING_ENV).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(exe);
        if let Some(argv0) = args.next() {
            command.arg0(argv0);
        }
        let error = command
            .args(args)
            .env("GLIBC_TUNABLES", TUNABLES)
            .env(TUNING_ENV, "applied")
            .exec();
        tracing::debug!("could not restart with tuned allocator settings: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunables_are_within_glibc_limits() {
        // glibc ignores an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit), which
        // would silently bring back the per-step page faults.
        for (name, max) in [
            ("glibc.malloc.mmap_threshold", 32u64 << 20),
            ("glibc.malloc.trim_threshold", u64::MAX),
        ] {
            let value: u64 = TUNABLES
                .split(':')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing"))
                .parse()
                .unwrap();
            assert!(value > 0 && value <= max, "{name}={value}");
        }
    }
}
