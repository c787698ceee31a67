//! `qcow2 io` against qemu-io: the same commands on twin images, the same standard output (timing values
//! masked), the same messages on standard error (`qemu-io:` read as `qcow2:`) and the same exit status;
//! then the same image content.

mod common;

use std::process::Command;

use common::{qcow2_bin, run_with_timeout, Out, Work, ORACLE_TIMEOUT};

/// Output with the timing line's values masked (they differ from run to run).
fn mask(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|l| match l.split_once(" ops; ") {
            Some((head, _)) => format!("{head} ops; <timing>\n"),
            None => l.to_string(),
        })
        .collect()
}

fn twins(w: &Work, opts: &str) {
    for name in ["theirs.qcow2", "ours.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "1M"]);
    }
}

fn run_both(w: &Work, flags: &[&str], cmds: &[&str]) -> (Out, Out) {
    let args = |image: &str| -> Vec<String> {
        let mut v: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        for c in cmds {
            v.push("-c".into());
            v.push(c.to_string());
        }
        v.push(image.into());
        v
    };
    let mut q = Command::new("qemu-io");
    q.args(args("theirs.qcow2")).current_dir(w.path());
    let mut o = Command::new(qcow2_bin());
    o.arg("io").args(args("ours.qcow2")).current_dir(w.path());
    (
        run_with_timeout(q, ORACLE_TIMEOUT),
        run_with_timeout(o, ORACLE_TIMEOUT),
    )
}

/// How to compare standard output.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    /// Line for line.
    Exact,
    /// As sorted lines (aio completions come in any order).
    Sorted,
    /// Not at all (a usage line, whose text is ours).
    Usage,
}

fn sorted(text: &str) -> Vec<String> {
    let mut v: Vec<String> = mask(text).lines().map(str::to_string).collect();
    v.sort();
    v
}

/// Runs `cmds` through both tools; asserts the same exit status, stderr and stdout (see [`Check`]).
fn same(w: &Work, flags: &[&str], cmds: &[&str], check: Check) {
    let (theirs, ours) = run_both(w, flags, cmds);
    assert!(!ours.panicked() && !ours.timed_out, "{}", ours.describe());
    let ctx = || {
        format!(
            "commands {cmds:?}\nqemu-io: {}\nours: {}",
            theirs.describe(),
            ours.describe()
        )
    };
    assert_eq!(
        theirs.status.and_then(|s| s.code()),
        ours.status.and_then(|s| s.code()),
        "exit status differs: {}",
        ctx()
    );
    assert_eq!(
        theirs.stderr.replace("qemu-io: ", "qcow2: "),
        ours.stderr,
        "stderr differs: {}",
        ctx()
    );
    if check == Check::Sorted {
        assert_eq!(
            sorted(&theirs.stdout_str()),
            sorted(&ours.stdout_str()),
            "stdout differs: {}",
            ctx()
        );
    }
    if check == Check::Exact {
        assert_eq!(
            mask(&theirs.stdout_str()),
            mask(&ours.stdout_str()),
            "stdout differs: {}",
            ctx()
        );
    }
}

fn compare_images(w: &Work) {
    w.qemu_img(&["compare", "-q", "ours.qcow2", "theirs.qcow2"]);
    w.qemu_img(&["check", "-q", "ours.qcow2"]);
}

#[test]
fn outputs_messages_and_exit_status_as_qemu_io() {
    let w = Work::new();
    twins(&w, "cluster_size=65536");
    let cases: &[&[&str]] = &[
        &[
            "write -P 0xab 0 4k",
            "read -P 0xab 0 4k",
            "read -P 0xac 0 4k",
        ],
        &["write -P 0x41 4k 40", "read -v 4k 40", "read -v 4k 17"],
        &["read 0 x"],
        &["read 0 1.5"],
        &["read 0"],
        &["foo"],
        &["flush x"],
        &["aio_flush x"],
        &["write -P 300 0 1"],
        &["write -P 0x 0 1"],
        &["write -u 0 1"],
        &["write -z -P 1 0 1"],
        &["read 0 3G"],
        &["write 0 3G"],
        &["discard 0 3G"],
        &["aio_write 0 3G"],
        &["read 1024 18446744073709551615"],
        &["read 0 2M"],
        &["write 1M 1"],
        &["write -z 0 2M"],
        &["discard 0 2M"],
        &["aio_write -P 5 1 3", "aio_flush", "read -P 5 1 3"],
        &["aio_write -P 6 0 512 512", "aio_flush", "read -P 6 0 1k"],
        &["read 0 0", "write 0 0"],
        &["read -q 0 512", "write -q -P 1 0 512", "discard -q 64k 64k"],
        &["read -P 1 -s 0 -l 10 0 512", "read -P 1 -s 10 0 512"],
        &["read 0x200 0x200", "write 1.5k 512", "write -P 07 2k 1"],
        &[
            "write -z 1 512",
            "write -z -u 64k 128k",
            "discard 1 512",
            "flush",
        ],
        &["w -P 9 0 1", "r -P 9 0 1", "f", "q", "read 0 1"],
        &[""],
    ];
    for cmds in cases {
        same(&w, &[], cmds, Check::Exact);
    }
    // Usage lines are our own text: compare status and stderr only.
    for cmds in [&["write -x 0 1"][..], &["read 10 10 10"], &["read -P"]] {
        same(&w, &[], cmds, Check::Usage);
    }
    compare_images(&w);
}

#[test]
fn read_only_and_backends() {
    let w = Work::new();
    twins(&w, "cluster_size=4096");
    same(
        &w,
        &["-r"],
        &["write 0 1", "read 0 1", "discard 0 1"],
        Check::Exact,
    );
    same(
        &w,
        &["-r", "-U"],
        &["aio_write 0 1", "read -P 0 0 4k"],
        Check::Exact,
    );
    let script: &[&str] = &[
        "write -P 1 0 64k",
        "aio_write -P 2 4k 4k",
        "aio_write -P 3 12k 8k",
        "aio_flush",
        "read -P 2 4k 4k",
        "read -P 3 12k 8k",
        "write -z 8k 4k",
        "discard 32k 32k",
        "read -P 0 32k 32k",
    ];
    for flags in [
        &["-i", "threads"][..],
        &["-i", "io_uring"],
        &["-t", "none", "-i", "io_uring"],
        &["-n"],
    ] {
        twins(&w, "cluster_size=4096");
        same(&w, flags, script, Check::Sorted);
        compare_images(&w);
    }
}

#[test]
fn commands_from_stdin_with_prompts() {
    let w = Work::new();
    twins(&w, "cluster_size=65536");
    w.write_file(
        "script.txt",
        b"write -P 1 0 512\nread -P 1 0 512\n\nbogus\nread 0 0\nwrite -z 64k 64k\n",
    );
    let run = |program: &str, image: &str| {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("exec \"$0\" \"$@\" < script.txt")
            .arg(program)
            .current_dir(w.path());
        if program == "qemu-io" {
            c.arg(image);
        } else {
            c.args(["io", image]);
        }
        run_with_timeout(c, ORACLE_TIMEOUT)
    };
    let theirs = run("qemu-io", "theirs.qcow2");
    let bin = qcow2_bin();
    let ours = run(bin.to_str().expect("utf-8 path"), "ours.qcow2");
    assert_eq!(mask(&theirs.stdout_str()), mask(&ours.stdout_str()));
    assert_eq!(theirs.stderr, ours.stderr);
    assert_eq!(
        theirs.status.and_then(|s| s.code()),
        ours.status.and_then(|s| s.code())
    );
    compare_images(&w);
}

/// `qcow2 bench -w`: qemu-img bench's banner, every request written with the pattern at its offset (gaps
/// of the step stay unallocated zeros), a clean image afterwards, in every backend / flush mode.
#[test]
fn bench_write_mode() {
    let w = Work::new();
    for flags in [
        &[][..],
        &["--flush-interval", "100"],
        &["--flush-interval", "100", "--no-drain"],
        &["-i", "io_uring", "--flush-interval", "50"],
        &["-t", "none", "-i", "io_uring"],
        &["-t", "none", "-i", "threads"],
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "16M"]);
        let mut args = vec![
            "bench",
            "-w",
            "-c",
            "1000",
            "-d",
            "16",
            "-s",
            "4096",
            "-S",
            "8192",
            "-o",
            "4096",
            "--pattern",
            "0x5a",
        ];
        args.extend_from_slice(flags);
        args.push("b.qcow2");
        let o = w.qcow2_try(&args, &[], ORACLE_TIMEOUT);
        assert!(o.success(), "{}", o.describe());
        let text = o.stdout_str();
        assert!(
            text.starts_with(
                "Sending 1000 write requests, 4096 bytes each, 16 in parallel (starting at offset 4096, step size 8192)\n"
            ),
            "{text}"
        );
        assert!(text.contains("Run completed in "), "{text}");
        assert_eq!(
            text.contains("Sending flush every"),
            flags.contains(&"--flush-interval"),
            "{text}"
        );
        w.qemu_img(&["check", "-q", "b.qcow2"]);
        // 1000 requests of 4 KiB every 8 KiB from 4 KiB: [4k, 8M) alternating data / zeros.
        w.qemu_io(
            &[],
            "b.qcow2",
            &[
                "read -P 0 0 4k",
                "read -P 0x5a 4k 4k",
                "read -P 0 8k 4k",
                "read -P 0x5a 7996k 4k",
                "read -P 0 8000k 8M",
            ],
        );
    }
}
