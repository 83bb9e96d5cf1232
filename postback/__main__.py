from postback import main

main()
