"""The Autobahn TestSuite run (make conformance); not collected by pytest."""
