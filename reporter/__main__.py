from broker.config import exit_now
from reporter.cli import main

exit_now(main())
