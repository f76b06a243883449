package main

import (
	"errors"
	"flag"
	"fmt"
	"strings"
)

// splitVerb takes the action of a command with several (`nodes add ...`)
// off args; without one the action is "ls".
func splitVerb(args []string, verbs map[string][]string) (string, []string) {
	if len(args) > 0 {
		if _, ok := verbs[args[0]]; ok {
			return args[0], args[1:]
		}
	}
	return "ls", args
}

// checkVerbArgs refuses positional arguments that are not the ones the
// action takes, printing its form and the command's usage.
func checkVerbArgs(e *env, fs *flag.FlagSet, verb string, pos []string, verbs map[string][]string) error {
	want := verbs[verb]
	if len(pos) == len(want) {
		return nil
	}
	fmt.Fprintf(e.stderr, "comfyfarm %s %s: want %s\n", fs.Name(), verb, strings.Join(append([]string{verb}, want...), " "))
	fs.Usage()
	return errUsage
}

// apiKey is the key a client command uses: the flag's, else
// COMFYFARM_API_KEY, else COMFYFARM_ADMIN_KEY.
func apiKey(e *env, flagKey string) (string, error) {
	for _, k := range []string{flagKey, e.getenv("COMFYFARM_API_KEY"), e.getenv("COMFYFARM_ADMIN_KEY")} {
		if k != "" {
			return k, nil
		}
	}
	return "", errors.New("no API key: pass --key or set COMFYFARM_API_KEY")
}
