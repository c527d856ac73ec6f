//! The spawner's last check (issue 29, 4): a daemon woken after a pause
//! longer than its lease must not start a child for a line it may no longer
//! hold. Its own test binary: the gate is process-wide.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ttspool::process::{run, set_spawn_gate, BaseEnv, ChildSpec, Exit};

fn spec(marker: &std::path::Path) -> ChildSpec {
    ChildSpec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo started >> {}", marker.display()),
        ],
        base: BaseEnv::new(&["PATH".into()], &Default::default(), &[]),
        env: Vec::new(),
        cwd: None,
        timeout: Duration::from_secs(10),
        kill_grace: Duration::from_secs(1),
        tail_bytes: 1024,
        pipes: false,
    }
}

#[test]
fn a_closed_gate_starts_no_child_and_hands_the_task_back() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let open = Arc::new(AtomicBool::new(false));
    let o = open.clone();
    set_spawn_gate(Box::new(move || o.load(Ordering::SeqCst)));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let res = rt.block_on(run(&spec(&marker), rx.clone()));
    assert!(
        matches!(res.exit, Exit::Cancelled),
        "not started, not failed: {:?}",
        res.exit
    );
    assert!(!marker.exists(), "the child ran although the gate was shut");
    open.store(true, Ordering::SeqCst);
    let res = rt.block_on(run(&spec(&marker), rx));
    assert!(
        matches!(res.exit, Exit::Exited(st) if st.success()),
        "{:?}",
        res.exit
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "started\n");
}
