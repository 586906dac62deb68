//! `pictor`: the command-line front of Pictor. Runs text-to-image, img2img and InstructPix2Pix on a local models
//! folder,
//! manages models, and makes a demo model.

mod args;
mod bench;
mod check_fixtures;
mod engine_backend;
mod from_png;
mod generate;
mod huge_pages;
mod init_image;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use args::{Cli, Command, ModelsCommand};

#[global_allocator]
static ALLOCATOR: huge_pages::HugePages = huge_pages::HugePages;

fn main() -> ExitCode {
    huge_pages::tune_system_allocator();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The options given on the command line (or in the environment), which --from-png never replaces.
    let explicit = |id: &str| {
        matches.subcommand().is_some_and(|(_, m)| {
            m.try_contains_id(id).unwrap_or(false)
                && matches!(
                    m.value_source(id),
                    Some(
                        clap::parser::ValueSource::CommandLine
                            | clap::parser::ValueSource::EnvVariable
                    )
                )
        })
    };
    // The service logs its progress; the one-shot commands only warnings.
    let (default_level, json) = match &cli.command {
        Command::Serve(a) => ("info", a.log_json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PICTOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    // PICTOR_CPU: a tier the CPU cannot run, or an unknown name, stops every command here.
    match pictor_engine::kernels::tier::from_env() {
        Ok(Some(tier)) => {
            pictor_engine::kernels::tier::set(tier).expect("from_env checked the tier");
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(
        "CPU kernels: {} tier (this CPU's best: {})",
        pictor_engine::kernels::tier::Tier::active(),
        pictor_engine::kernels::tier::Tier::best()
    );
    let result = match cli.command {
        Command::Serve(a) => serve::serve(*a),
        Command::Txt2img(a) => generate::txt2img(a, &explicit),
        Command::Img2img(a) => generate::img2img(a, &explicit),
        Command::Bench(a) => bench::bench(&a),
        Command::CheckFixtures(a) => check_fixtures::check_fixtures(&a),
        Command::Pix2pix(a) => generate::pix2pix(a, &explicit),
        Command::Styles { name } => generate::styles(name.as_deref()),
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
