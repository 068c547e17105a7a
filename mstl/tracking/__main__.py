from mstl.tracking import main

main()
