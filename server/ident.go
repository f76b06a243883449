package server

import "github.com/comfyfarm/comfyfarm/schema"

// maxUserIDBytes bounds a frontend's user id at the API, below the column's
// schema.MaxUserIDBytes.
const maxUserIDBytes = 128

// checkUserID validates a frontend's user id from a path, a body or a query:
// 1 to 128 bytes of printable UTF-8, no white space at either end (400
// invalid_request naming field). Ids are compared byte for byte, so "bob "
// would be a user of its own that looks like bob: it is refused instead.
func checkUserID(field, id string) error {
	return schema.CheckIdent(field, id, maxUserIDBytes)
}
