//! The hot inner pieces: digest hashing throughput (aws-lc-rs SHA-256/512, as the blob writer
//! hashes while it writes), request classification (`oci::Route::classify`, run on every
//! request), and leaf minting (`CertificateAuthority::server_config` for a new host, paid on
//! the first CONNECT to each registry).
//!
//! `cargo bench --bench hot`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::digest::{Context, SHA256, SHA512};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use stowage::ingress::ca::CertificateAuthority;
use stowage::oci::Route;

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest");
    // The fill path hands the hasher whatever frames upstream sent (tens of KiB) and the
    // verifier reads 1 MiB at a time.
    for (name, alg) in [("sha256", &SHA256), ("sha512", &SHA512)] {
        for chunk in [16 * 1024, 1 << 20] {
            let buf = vec![0x5au8; chunk];
            let total = 16usize << 20;
            g.throughput(Throughput::Bytes(total as u64));
            g.bench_function(
                format!("{name}/16MiB_in_{}KiB_updates", chunk / 1024),
                |b| {
                    b.iter(|| {
                        let mut ctx = Context::new(alg);
                        for _ in 0..total / chunk {
                            ctx.update(black_box(&buf));
                        }
                        black_box(ctx.finish())
                    })
                },
            );
        }
    }
    g.finish();
}

fn classify(c: &mut Criterion) {
    let hex = "b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
    let paths = [
        ("blob", format!("/v2/library/ubuntu/blobs/sha256:{hex}")),
        (
            "blob_deep_name",
            format!("/v2/org/team/project/sub/image/blobs/sha256:{hex}"),
        ),
        (
            "manifest_tag",
            "/v2/library/ubuntu/manifests/22.04".to_owned(),
        ),
        (
            "manifest_digest",
            format!("/v2/library/ubuntu/manifests/sha256:{hex}"),
        ),
        ("other_ping", "/v2/".to_owned()),
        (
            "other_bad_digest",
            "/v2/library/ubuntu/blobs/sha256:XYZ".to_owned(),
        ),
    ];
    let mut g = c.benchmark_group("classify");
    for (name, path) in &paths {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(Route::classify(black_box(path))))
        });
    }
    g.finish();
}

fn minting(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_create(dir.path()).expect("CA");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("ca");
    g.sample_size(30);
    // A new host each time: key generation, signing, and the rustls ServerConfig.
    g.bench_function("mint_leaf_new_host", |b| {
        b.iter_batched(
            || format!("registry-{}.example.com", n.fetch_add(1, Ordering::Relaxed)),
            |host| black_box(rt.block_on(ca.server_config(&host)).expect("mint")),
            BatchSize::SmallInput,
        )
    });
    // The cached path every later connection to that host takes.
    rt.block_on(ca.server_config("quay.io")).expect("mint");
    g.bench_function("cached_leaf", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(ca.server_config(black_box("quay.io")))
                    .expect("cached"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, hashing, classify, minting);
criterion_main!(benches);
