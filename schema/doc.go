// Package schema is comfyfarm's shared vocabulary: jobs and their states, job
// events, nodes and probe results, photos, users, sentinel errors, and the
// embedded SQL migrations of the control and frontend databases.
//
// It imports no other package of the project.
package schema
