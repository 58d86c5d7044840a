from nasprune.cli import main

main()
