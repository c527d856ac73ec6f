//! A share whose locks do not span hosts: one folder mounted twice over
//! sshfs (a real sshd on loopback) stands in for two hosts. The second
//! daemon must refuse with a message that names the mount and the fix, and
//! nothing may be doubled. Skips with a message where FUSE, sshfs or sshd
//! are missing (CI installs them).

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Sshfs {
    sshd: Child,
    mounts: Vec<PathBuf>,
}

impl Drop for Sshfs {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn have(prog: &str) -> bool {
    Path::new(prog).exists()
        || std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).exists()))
}

/// Starts sshd on a free loopback port and mounts `share` at each of `at`.
fn mount_twice(dir: &Path, share: &Path, at: &[PathBuf]) -> Option<Sshfs> {
    if !Path::new("/dev/fuse").exists()
        || !have("sshfs")
        || !have("/usr/sbin/sshd")
        || !have("ssh-keygen")
    {
        eprintln!("skipped: needs /dev/fuse, sshfs and openssh-server (apt-get install sshfs openssh-server)");
        return None;
    }
    let key = dir.join("key");
    let host_key = dir.join("host_key");
    for k in [&key, &host_key] {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .status()
            .ok()?
            .success();
        assert!(ok, "ssh-keygen");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("sshd_config");
    fs::write(
        &conf,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPermitRootLogin prohibit-password\n\
             AuthorizedKeysFile {}.pub\nStrictModes no\nPidFile none\nUsePAM no\n\
             Subsystem sftp internal-sftp\n",
            host_key.display(),
            key.display()
        ),
    )
    .unwrap();
    fs::create_dir_all("/run/sshd").ok();
    let sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut m = Sshfs {
        sshd,
        mounts: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            eprintln!("skipped: sshd did not start");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for mp in at {
        fs::create_dir_all(mp).unwrap();
        let ok = Command::new("sshfs")
            .arg("-p")
            .arg(port.to_string())
            .arg("-o")
            .arg(format!(
                "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
                key.display()
            ))
            .arg(format!("root@127.0.0.1:{}", share.display()))
            .arg(mp)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipped: sshfs could not mount (is FUSE usable here?)");
            return None;
        }
        m.mounts.push(mp.clone());
    }
    Some(m)
}

/// A folder `share` with a spool, mounted at `ma` and `mb`.
fn share_mounted_twice(env: &Env) -> Option<(PathBuf, PathBuf, PathBuf, Sshfs)> {
    let share = env.root().join("share");
    fs::create_dir_all(share.join("spool/pending")).unwrap();
    let (ma, mb) = (env.root().join("ma"), env.root().join("mb"));
    let mounts = mount_twice(env.root(), &share, &[ma.clone(), mb.clone()])?;
    Some((share, ma, mb, mounts))
}

/// The config of daemon `name` with its spool through `mount`, as `file`.
fn config_via(env: &Env, name: &str, mount: &Path, file: &str) -> PathBuf {
    let text = fs::read_to_string(env.instance_config(name))
        .unwrap()
        .replace(
            "dir = \"spool\"",
            &format!("dir = \"{}/spool\"", mount.display()),
        );
    let p = env.root().join(file);
    fs::write(&p, text).unwrap();
    p
}

/// `ttspool run` with `config`, its log in `daemon-a.log`.
fn spawn_with(env: &Env, config: &Path) -> Child {
    let log = fs::File::create(env.root().join("daemon-a.log")).unwrap();
    env.cmd_with(config, &["run"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Records in the share's logs, counted by `key` of each record.
fn records_by(share: &Path, key: impl Fn(&serde_json::Value) -> String) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in read_jsonl(&share.join("spool/done.jsonl"))
        .into_iter()
        .chain(read_jsonl(&share.join("spool/failed.jsonl")))
    {
        *out.entry(key(&r)).or_default() += 1;
    }
    out
}

#[test]
fn a_second_daemon_on_another_mount_of_a_lockless_share_refuses() {
    let env = Env::new("");
    let Some((share, ma, mb, _mounts)) = share_mounted_twice(&env) else {
        return;
    };
    // The two "hosts": the same config, each through its own mount.
    let (ca, cb) = (
        config_via(&env, "a", &ma, "a.toml"),
        config_via(&env, "b", &mb, "b.toml"),
    );
    let ca_on_mb = config_via(&env, "a", &mb, "a-on-mb.toml");
    let check = env.cmd_with(&cb, &["check"]).output().unwrap();
    let warn = String::from_utf8_lossy(&check.stderr);
    assert!(
        warn.contains("fuse.sshfs") && warn.contains("one host"),
        "check: {warn}"
    );
    let lines: String = (0..200).map(|i| task_line(&format!("s{i}"), "x")).collect();
    let tmp = ma.join("spool/pending/.s.tmp");
    fs::write(&tmp, lines).unwrap();
    fs::rename(&tmp, ma.join("spool/pending/s.jsonl")).unwrap();
    let mut a = spawn_with(&env, &ca);
    let records = || records_by(&share, |r| r["source"]["line"].to_string());
    wait_until(60, "a at work", || !records().is_empty());
    // b, through the other mount, and again under a's own name.
    for (name, conf) in [("b", &cb), ("a (again)", &ca_on_mb)] {
        let out = env.run_with(conf, &["run"], 60);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was not refused: {err}");
        assert!(
            err.contains("fuse.sshfs")
                && err.contains("one host")
                && err.contains(&mb.display().to_string()),
            "{name}: {err}"
        );
    }
    wait_until(120, "200 records", || records().len() == 200);
    sigterm(&a);
    assert!(a.wait().unwrap().success());
    let r = records();
    assert!(r.values().all(|&n| n == 1), "{r:?}");
    let starts = env.starts();
    assert!(starts.values().all(|&n| n == 1), "{starts:?}");
}

#[test]
fn a_daemon_restarted_on_another_mount_of_the_share_keeps_the_claims() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("[gpu]\nmax_parallel = 1\n");
    let Some((share, ma, mb, _mounts)) = share_mounted_twice(&env) else {
        return;
    };
    let (ca, cb) = (
        config_via(&env, "a", &ma, "a.toml"),
        config_via(&env, "a", &mb, "b.toml"),
    );
    // sshfs numbers inodes per mount, in the order it meets paths: let
    // mount b meet other files first, so the task file's numbers differ.
    for i in 0..5 {
        fs::write(share.join(format!("spool/other{i}")), "").unwrap();
        fs::metadata(mb.join(format!("spool/other{i}"))).unwrap();
    }
    let lines: String = (0..30)
        .map(|i| task_line(&format!("m{i}"), "NAP"))
        .collect();
    fs::write(share.join("spool/pending/.s.tmp"), lines).unwrap();
    fs::rename(
        share.join("spool/pending/.s.tmp"),
        share.join("spool/pending/s.jsonl"),
    )
    .unwrap();
    let (ia, ib) = (
        fs::metadata(ma.join("spool/pending/s.jsonl"))
            .unwrap()
            .ino(),
        fs::metadata(mb.join("spool/pending/s.jsonl"))
            .unwrap()
            .ino(),
    );
    assert_ne!(ia, ib, "the two mounts must number the file differently");
    let mut a = spawn_with(&env, &ca);
    let records = || records_by(&share, |r| r["id"].as_str().unwrap().to_string());
    wait_until(60, "a few records", || records().len() >= 4);
    sigterm(&a);
    assert!(a.wait().unwrap().success());
    let before = records().len();
    assert!(before < 30, "a finished everything before it stopped");
    // The same daemon, restarted through the other mount.
    let out = env.run_with(&cb, &["run", "--once"], 120);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = records();
    assert_eq!(r.len(), 30, "{r:?}");
    assert!(r.values().all(|&n| n == 1), "{r:?}");
    let starts = env.starts();
    assert!(starts.values().all(|&n| n == 1), "{starts:?}");
}
