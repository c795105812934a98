from atsmail.cli import main

main()
