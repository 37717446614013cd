//! `blockrep generate man DIR` and `blockrep generate completions SHELL DIR` (hidden): man pages and shell
//! completions rendered from the clap definitions, for `scripts/install.sh` and packagers.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::{Cli, GenerateCommand};

/// Runs one `generate` command, printing each file written.
pub fn run(cmd: &GenerateCommand) -> Result<()> {
    match cmd {
        GenerateCommand::Man { dir } => {
            create(dir)?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()))?;
            let mut pages: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            pages.retain(|p| p.extension().is_some_and(|e| e == "1"));
            pages.sort();
            for p in pages {
                println!("{}", p.display());
            }
        }
        GenerateCommand::Completions { shell, dir } => {
            create(dir)?;
            let path = clap_complete::generate_to(*shell, &mut Cli::command(), "blockrep", dir)
                .with_context(|| format!("cannot write {shell} completions to {}", dir.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
