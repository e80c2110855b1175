use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;

#[test]
fn every_shard_runs_on_a_thread_of_its_own_and_knows_its_index() {
    let shards = Shards::new(4).unwrap();
    let set = shards.set();
    assert_eq!(set.len(), 4);
    let seen = shards.block_on(async move {
        let mut seen = Vec::new();
        for index in 0..set.len() {
            let where_ = set
                .handle(index)
                .spawn(async { (Shards::current(), std::thread::current().id()) })
                .await
                .unwrap();
            seen.push(where_);
        }
        seen
    });
    let threads: HashSet<_> = seen.iter().map(|(_, thread)| *thread).collect();
    assert_eq!(threads.len(), 4, "one thread per shard");
    for (index, (shard, _)) in seen.iter().enumerate() {
        assert_eq!(shard.map(Shard::index), Some(index));
    }
    assert_eq!(
        seen[0].1,
        std::thread::current().id(),
        "shard 0 is the caller"
    );
    // Outside `block_on` the caller runs no shard.
    assert_eq!(Shards::current(), None);
    assert!(ShardSet::current().is_none());
    let found = shards.block_on(async {
        let set = ShardSet::current().expect("on a shard");
        let on_two = set
            .handle(2)
            .spawn(async { ShardSet::current().map(|set| set.len()) });
        (set.len(), on_two.await.unwrap())
    });
    assert_eq!(found, (4, Some(4)));
}

#[test]
fn a_shard_from_another_set_is_not_taken_for_ours() {
    let first = Shards::new(2).unwrap();
    let second = Shards::new(2).unwrap();
    let theirs = first.block_on(async { Shards::current().unwrap() });
    assert_eq!(first.set().index_of(theirs), Some(0));
    assert_eq!(second.set().index_of(theirs), None);
}

#[test]
fn many_edges_placed_at_once_spread_evenly_and_leave_no_count() {
    let shards = Shards::new(3).unwrap();
    let set = shards.set();
    // 300 placements from 300 tasks over every shard's thread at once.
    let places = shards.block_on({
        let set = set.clone();
        async move {
            let mut joins = Vec::new();
            for task in 0..300 {
                let set_for_task = set.clone();
                joins.push(
                    set.handle(task % set.len())
                        .spawn(async move { set_for_task.place_edge() }),
                );
            }
            let mut places = Vec::new();
            for join in joins {
                places.push(join.await.unwrap());
            }
            places
        }
    });
    let counts = set.edge_counts();
    assert_eq!(counts.iter().sum::<usize>(), 300);
    let (least, most) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    // Racing placements may read the same counts; the spread stays narrow.
    assert!(most - least <= 10, "uneven: {counts:?}");
    drop(places);
    assert_eq!(set.edge_counts(), vec![0, 0, 0]);
}

#[test]
fn placements_one_after_another_fill_the_emptiest_shard() {
    let shards = Shards::new(3).unwrap();
    let set = shards.set();
    let first: Vec<_> = (0..6).map(|_| set.place_edge()).collect();
    assert_eq!(set.edge_counts(), vec![2, 2, 2]);
    // Shard 1 loses both of its edges: the next two go there.
    let mut first = first;
    first.retain(|place| place.index() != 1);
    assert_eq!(set.edge_counts(), vec![2, 0, 2]);
    let next: Vec<_> = (0..2).map(|_| set.place_edge()).collect();
    assert!(next.iter().all(|place| place.index() == 1));
}

#[test]
fn dropping_the_shards_drops_their_tasks_and_joins_their_threads() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let shards = Shards::new(2).unwrap();
    let flag = Flag(Arc::clone(&dropped));
    let started = shards.block_on({
        let set = shards.set();
        async move {
            let (tell, told) = tokio::sync::oneshot::channel();
            let _forever = set.handle(1).spawn(async move {
                let _flag = flag;
                let _ = tell.send(());
                std::future::pending::<()>().await;
            });
            told.await.is_ok()
        }
    });
    assert!(started);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(shards);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the pending task was dropped"
    );
}
