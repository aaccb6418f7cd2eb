"""`python -m gpt2dist` and the `gpt2dist` command. SLURM's requeue signal is recorded before anything heavy is
imported (`gpt2dist.early_signal`): the package's own imports take seconds, and SIGUSR1 would kill them."""

from gpt2dist import early_signal


def run() -> None:
    early_signal.install()
    from gpt2dist.cli import main

    main()


if __name__ == "__main__":
    run()
