package dbcontrollers

import (
	"database/sql/driver"
	"fmt"
	"time"
)

// timeLayout is how times are written in both dialects: UTC, microseconds,
// fixed width, so text order is time order on SQLite and MySQL's DATETIME(6)
// takes it as is.
const timeLayout = "2006-01-02 15:04:05.000000"

// readLayouts are the forms a time may come back in as text.
var readLayouts = []string{
	timeLayout,
	"2006-01-02 15:04:05.999999999",
	"2006-01-02 15:04:05.999999999-07:00",
	time.RFC3339Nano,
	"2006-01-02 15:04:05",
}

// dbTimeOf rounds t to what the databases keep: UTC microseconds.
func dbTimeOf(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// tval is a time as a statement argument.
type tval time.Time

func (t tval) Value() (driver.Value, error) {
	return dbTimeOf(time.Time(t)).Format(timeLayout), nil
}

// ntval is a nullable time as a statement argument.
func ntval(t *time.Time) any {
	if t == nil {
		return nil
	}
	return tval(*t)
}

// parseDBTime reads a time written as text.
func parseDBTime(s string) (time.Time, error) {
	for _, l := range readLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("unreadable time %q", s)
}

// nullTime scans a nullable DATETIME(6) (MySQL) or TEXT time (SQLite).
type nullTime struct {
	Time  time.Time
	Valid bool
}

func (n *nullTime) Scan(v any) error {
	switch x := v.(type) {
	case nil:
		*n = nullTime{}
		return nil
	case time.Time:
		*n = nullTime{Time: x.UTC(), Valid: true}
		return nil
	case string:
		t, err := parseDBTime(x)
		if err != nil {
			return err
		}
		*n = nullTime{Time: t, Valid: true}
		return nil
	case []byte:
		t, err := parseDBTime(string(x))
		if err != nil {
			return err
		}
		*n = nullTime{Time: t, Valid: true}
		return nil
	}
	return fmt.Errorf("cannot scan %T into a time", v)
}

// Ptr returns the time or nil.
func (n nullTime) Ptr() *time.Time {
	if !n.Valid {
		return nil
	}
	t := n.Time
	return &t
}

// dbTime scans a NOT NULL time.
type dbTime struct{ time.Time }

func (d *dbTime) Scan(v any) error {
	var n nullTime
	if err := n.Scan(v); err != nil {
		return err
	}
	if !n.Valid {
		return fmt.Errorf("unexpected NULL time")
	}
	d.Time = n.Time
	return nil
}
