"""vzdump's contract (docs/design.md §1): its phases and their order, where each guest type and mode
may resume, what each phase tells whom, which exit status each outcome gets, and the chained scripts'
rules. Everything else asks these modules."""
