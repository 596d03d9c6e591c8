//! `hearth`: parse the command line and run it; any error is one line on stderr and exit 1.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = hearth_cli::Cli::parse();
    if let Err(err) = hearth_cli::run(cli).await {
        eprintln!("hearth: {err:#}");
        std::process::exit(1);
    }
}
