from broker.config import exit_now
from broker.cli import main

exit_now(main())
