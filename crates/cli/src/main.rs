//! `pictor`: the command-line front of Pictor. Runs img2img and InstructPix2Pix on a local models folder,
//! manages models, and makes a demo model.

mod args;
mod generate;
mod init_image;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command, ModelsCommand};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PICTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Img2img(a) => generate::img2img(a),
        Command::Pix2pix(a) => generate::pix2pix(a),
        Command::Models(ModelsCommand::List { models_dir }) => generate::list_models(&models_dir),
        Command::Models(ModelsCommand::Pull {
            models_dir,
            repo_id,
            revision,
        }) => generate::pull(&models_dir, &repo_id, revision.as_deref()),
        Command::MakeDemoModel {
            path,
            pix2pix,
            seed,
        } => generate::make_demo(&path, pix2pix, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
