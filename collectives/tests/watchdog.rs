//! The collectives watchdog on in-process ranks: a rank that stops answering is named,
//! with the collective the others waited in; a healthy group never trips it.

use fp8lm_collectives::{run_ranks, Communicator, ReduceOp, Watchdog};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn recorder() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn() -> fp8lm_collectives::watchdog::OnTimeout,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (log, move || {
        let l = l.clone();
        Box::new(move |m: &str| l.lock().unwrap().push(m.to_string()))
    })
}

#[test]
fn a_silent_rank_is_named_with_the_collective() {
    let (log, make) = recorder();
    let make = Arc::new(Mutex::new(make));
    let t0 = Instant::now();
    run_ranks(2, |c| {
        let on = (make.lock().unwrap())();
        let wd = Watchdog::new(c, Duration::from_millis(200), on);
        if wd.rank() == 1 {
            // Stands for a rank stopped with SIGSTOP: it does not take part for a while.
            std::thread::sleep(Duration::from_millis(1200));
        }
        let s = wd.all_reduce_scalar(1.0 + wd.rank() as f32, ReduceOp::Sum)?;
        assert_eq!(s, 3.0);
        Ok::<_, fp8lm_collectives::CommError>(())
    })
    .unwrap();
    let msgs = log.lock().unwrap().clone();
    assert_eq!(msgs.len(), 1, "only the waiting rank times out: {msgs:?}");
    let m = &msgs[0];
    assert!(
        m.contains("rank 0 of 2")
            && m.contains("no answer from rank 1")
            && m.contains("reduce_scatter")
            && m.contains("dist.timeout_s"),
        "{m}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(1200));
}

#[test]
fn a_healthy_group_never_trips_it() {
    let (log, make) = recorder();
    let make = Arc::new(Mutex::new(make));
    run_ranks(3, |c| {
        let on = (make.lock().unwrap())();
        let wd = Watchdog::new(c, Duration::from_millis(500), on);
        for i in 0..200 {
            let s = wd.all_reduce_scalar(i as f32, ReduceOp::Max)?;
            assert_eq!(s, i as f32);
            wd.barrier()?;
        }
        Ok::<_, fp8lm_collectives::CommError>(())
    })
    .unwrap();
    assert!(log.lock().unwrap().is_empty());
}
