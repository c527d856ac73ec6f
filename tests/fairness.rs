//! Fairness: a one-line file dropped after a 5,000-line file finishes long
//! before the big one does.

mod common;

use common::*;

#[test]
fn a_small_file_is_not_starved_by_a_big_one() {
    let env = Env::new("");
    let big: String = (0..5000)
        .map(|i| task_line(&format!("big{i}"), "x"))
        .collect();
    env.drop_file("big.jsonl", &big);
    let mut d = env.spawn("a");
    wait_until(60, "the big file under way", || env.done().len() >= 50);
    env.drop_file("urgent.jsonl", &task_line("urgent", "now"));
    wait_until(120, "the urgent task", || {
        env.done().iter().any(|r| r["id"] == "urgent")
    });
    let done_big = env
        .done()
        .iter()
        .filter(|r| r["source"]["file"] == "big.jsonl")
        .count();
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    // The urgent line waited for at most a few claim rounds, not the file.
    assert!(
        done_big < 1000,
        "urgent finished only after {done_big} big-file tasks"
    );
    eprintln!("urgent finished after {done_big} of 5000 big-file tasks");
}
