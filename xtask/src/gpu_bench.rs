//! `cargo xtask bench gpu`: prepares the one-shot GPU benchmark (`benches/gpu.rs` of
//! disha-train) for a machine with an NVIDIA GPU and no Rust toolchain: two release builds
//! (`cuda,autotune`, and `cuda` alone for the fixed-matmul comparison), stripped and
//! xz-compressed, and a POSIX script that unpacks and runs them and prints the JSON, then
//! (where the GPU machine's python3 has torch, transformers and peft) the PyTorch + PEFT side,
//! `benches/python/peft_gpu.py`. Output in `target/gpu-bench/` (about 47 MB).
//!
//! Burn's `cuda` feature builds CubeCL's LLVM back end, whose build script downloads an LLVM
//! bundle; offline, an installed LLVM must stand in for it (docs: kernels chapter, "Building
//! for CUDA offline"). This task checks for that before a build of half an hour.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where CubeCL's LLVM bundler looks for its bundle, and the file that marks it installed.
const LLVM_BUNDLE: &str = ".local/share/tracel/tracel-llvm-23.1.0-4";
const LLVM_SENTINEL: &str = ".tracel-llvm-installed";

/// The script that runs on the GPU machine.
const RUN_SCRIPT: &str = r#"#!/bin/sh
# disha one-shot GPU benchmark (at most 9 minutes in all). Unpacks and runs, writing into $OUT
# (or next to this script):
# 1. disha-gpu-bench-fixed-matmul (Burn's matmul on one fixed routine, no autotuning): the kernel
#    rows alone, into gpu-bench-fixed-matmul.json (at most 1 minute);
# 2. disha-gpu-bench (built with `autotune`, Burn's default configuration): every section, into
#    gpu-bench.json, its progress log in gpu-bench.log (at most 6 minutes; a run stopped early,
#    status 124, prints and leaves in gpu-bench.partial.json the rows it measured);
# 3. where python3 has torch, transformers and peft, the PyTorch + PEFT side (peft_gpu.py:
#    cuBLAS's plain layer and the same Llama-3.2-1B-shaped steps) into peft-gpu.json (at most
#    100 seconds; DISHA_GPU_BENCH_PYTORCH=0 skips it).
# Prints gpu-bench.json last. DISHA_GPU_BENCH=smoke runs the small shapes instead.
set -e
here=$(cd "$(dirname "$0")" && pwd)
out="${OUT:-$here}"
mkdir -p "$out"
unpack() {
    xz -dc "$here/$1.xz" > "${TMPDIR:-/tmp}/$1"
    chmod +x "${TMPDIR:-/tmp}/$1"
    echo "${TMPDIR:-/tmp}/$1"
}
# CubeCL opens the CUDA driver and NVRTC at run time (dlopen). Where the loader's cache does not
# list NVRTC, look for it in the usual CUDA and Python-wheel places.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
        $(find /usr/local /opt -name 'libnvrtc.so*' -exec dirname {} \; 2>/dev/null | sort -u); do
        if ls "$lib"/libnvrtc.so* >/dev/null 2>&1; then
            LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export LD_LIBRARY_PATH
            echo "NVRTC from $lib" >&2
            break
        fi
    done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
export BURN_DEVICE="${BURN_DEVICE:-cuda}"
fixed=$(unpack disha-gpu-bench-fixed-matmul)
echo "kernel rows with the fixed matmul routine (gpu-bench-fixed-matmul.json):" >&2
DISHA_GPU_BENCH_ONLY=kernels DISHA_GPU_BENCH_PARTIAL="$out/gpu-bench-fixed-matmul.json" \
    timeout 60 "$fixed" > /dev/null 2> "$out/gpu-bench-fixed-matmul.log" \
    || echo "stopped with status $? (see gpu-bench-fixed-matmul.log)" >&2
tail -c 1500 "$out/gpu-bench-fixed-matmul.log" >&2
bin=$(unpack disha-gpu-bench)
log="$out/gpu-bench.log"
partial="$out/gpu-bench.partial.json"
status=0
DISHA_GPU_BENCH_PARTIAL="$partial" timeout 360 "$bin" > "$out/gpu-bench.json" 2> "$log" || status=$?
tail -c 6000 "$log" >&2
smoke=
[ "${DISHA_GPU_BENCH:-full}" = smoke ] && smoke=--smoke
if [ "${DISHA_GPU_BENCH_PYTORCH:-1}" != 0 ] && python3 -c 'import torch, transformers, peft' 2>/dev/null; then
    echo "PyTorch + PEFT side (peft-gpu.json):" >&2
    timeout 100 python3 "$here/peft_gpu.py" $smoke --out "$out/peft-gpu.json" > /dev/null \
        2> "$out/peft-gpu.log" || echo "peft_gpu.py stopped with status $? (see peft-gpu.log)" >&2
    cat "$out/peft-gpu.json" >&2 || true
fi
if [ "$status" -ne 0 ]; then
    echo "disha-gpu-bench stopped with status $status (124: its 6-minute limit); rows so far:" >&2
    cat "$partial" 2>/dev/null || echo "(none)" >&2
    exit "$status"
fi
rm -f "$partial"
cat "$out/gpu-bench.json"
"#;

/// The benchmark's two builds: the one every section runs with (Burn's default configuration,
/// CubeCL autotuning its matmul), and one without autotuning, whose kernel rows show what the
/// fixed routine costs.
const VARIANTS: [(&str, &str); 2] = [
    ("disha-gpu-bench", "cuda,autotune"),
    ("disha-gpu-bench-fixed-matmul", "cuda"),
];

/// Builds, strips and compresses the benchmark's variants and writes the run script.
pub(crate) fn prepare(root: &Path) -> Result<PathBuf, String> {
    let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
    let bundle = PathBuf::from(home).join(LLVM_BUNDLE);
    if std::env::var_os("DISHA_ONLINE_LLVM").is_none() && !bundle.join(LLVM_SENTINEL).is_file() {
        return Err(format!(
            "no LLVM bundle at {} (CubeCL's CUDA back end needs one at build time and would \
             download it): install one as the kernels chapter's \"Building for CUDA offline\" \
             says, or set DISHA_ONLINE_LLVM=1 where the download works",
            bundle.display()
        ));
    }
    let out = root.join("target/gpu-bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, features) in VARIANTS {
        let executable = build(root, features)?;
        let binary = out.join(name);
        std::fs::copy(&executable, &binary)
            .map_err(|e| format!("{}: {e}", executable.display()))?;
        run_tool("strip", &[binary.as_os_str()])?;
        let _ = std::fs::remove_file(out.join(format!("{name}.xz")));
        run_tool("xz", &["-6".as_ref(), "-T0".as_ref(), binary.as_os_str()])?;
    }
    let pytorch_side = root.join("benches/python/peft_gpu.py");
    std::fs::copy(&pytorch_side, out.join("peft_gpu.py"))
        .map_err(|e| format!("{}: {e}", pytorch_side.display()))?;
    let script = out.join("run.sh");
    std::fs::write(&script, RUN_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    run_tool("chmod", &["+x".as_ref(), script.as_os_str()])?;
    Ok(out)
}

/// A release build of disha-train's `gpu` bench with `features`; its executable's path.
fn build(root: &Path, features: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!(
        "==> release build of the GPU benchmark with `{features}` (the first about 35 minutes \
         cold on 2 cores, the second a few minutes more)"
    );
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "disha-train",
            "--features",
            features,
        ])
        .args(["--bench", "gpu", "--message-format=json-render-diagnostics"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the release build with `{features}` failed (see above)"
        ));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "gpu")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo reported no executable for the `gpu` bench".into())
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    match Command::new(program).args(args).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{program} failed ({s})")),
        Err(e) => Err(format!("could not start {program}: {e}")),
    }
}
