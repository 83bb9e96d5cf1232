from postback.cli import main

main()
