//! The courier server binary; see `courier_node::cli`.

fn main() -> anyhow::Result<()> {
    courier_node::cli::main()
}
