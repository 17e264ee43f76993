//! `hermes-bare-webhook`: the bare store-then-202 server that
//! `hermes-bench webhook-e2e` sets beside the host (`webhook_e2e_bare`; see
//! `hermes_benches::bare_webhook`). Reads `DATABASE_URL` and `HERMES_LISTEN`.

use anyhow::Context;

// The host's allocator, so that the two compare like for like.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
    let listen = std::env::var("HERMES_LISTEN").context("HERMES_LISTEN is not set")?;
    // One worker per core, as the host runs.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(hermes_benches::bare_webhook::serve(&database_url, &listen))
}
