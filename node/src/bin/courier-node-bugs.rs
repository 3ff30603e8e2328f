//! `courier-node` with deliberate bugs compiled in (cargo feature `bugs`), selected at startup by
//! `COURIER_BUG`. Only for proving that the Jepsen checker and the simulation catch those bug
//! classes; see `courier_node::bugs`.

fn main() -> anyhow::Result<()> {
    courier_node::cli::main()
}
