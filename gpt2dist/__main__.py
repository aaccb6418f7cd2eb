from gpt2dist.cli import main

main()
