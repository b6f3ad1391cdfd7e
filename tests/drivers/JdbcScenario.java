// pgjdbc as the scenario's client: one connection, driven one command a line on stdin
// by tests/test_more_drivers.py, one JSON reply a line on stdout. Run as a single-file
// source program (Java 11+):
//     java -cp /usr/share/java/postgresql.jar tests/drivers/JdbcScenario.java
// Commands as in pg8000_scenario.py: query SQL | begin | commit | rollback |
// notifications MS N | quit. Connection: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD.
// pgjdbc speaks the extended protocol only (Parse/Bind/Execute/Sync), and after
// prepareThreshold (5) runs of one PreparedStatement text it switches to a named
// server-side statement (COMMIT and ROLLBACK are named at once): both go through the
// pooler here.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class JdbcScenario {
    static String json(Object v) {
        if (v == null) return "null";
        if (v instanceof Number || v instanceof Boolean) return v.toString();
        if (v instanceof List) {
            StringBuilder b = new StringBuilder("[");
            for (Object o : (List<?>) v) {
                if (b.length() > 1) b.append(',');
                b.append(json(o));
            }
            return b.append(']').toString();
        }
        StringBuilder b = new StringBuilder("\"");
        for (char c : v.toString().toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    static Object query(Connection conn, String sql) throws SQLException {
        // A PreparedStatement, as JDBC code runs its queries: pgjdbc caches it by its text
        // (a plain Statement it never caches), so a text run prepareThreshold times is then
        // a named server-side statement, Bound again in later transactions.
        try (PreparedStatement st = conn.prepareStatement(sql)) {
            if (!st.execute()) return null;
            try (ResultSet rs = st.getResultSet()) {
                return rs.next() ? rs.getObject(1) : null;
            }
        }
    }

    static List<Object> notifications(Connection conn, int waitMs, int want) throws SQLException {
        // getNotifications(timeout) waits on the socket for NotificationResponses.
        PGConnection pg = conn.unwrap(PGConnection.class);
        List<Object> got = new ArrayList<>();
        long deadline = System.currentTimeMillis() + waitMs;
        while (got.size() < want) {
            long left = deadline - System.currentTimeMillis();
            if (left <= 0) break;
            PGNotification[] ns = pg.getNotifications((int) Math.min(left, 200));
            if (ns == null) continue;
            for (PGNotification n : ns) got.add(List.of(n.getName(), n.getParameter()));
        }
        return got;
    }

    static Object handle(Connection conn, String line) throws SQLException {
        int sp = line.indexOf(' ');
        String op = sp < 0 ? line : line.substring(0, sp);
        String arg = sp < 0 ? "" : line.substring(sp + 1);
        switch (op) {
            case "query":
                return query(conn, arg);
            case "begin":        // JDBC: the driver sends BEGIN with the next statement
                conn.setAutoCommit(false);
                return null;
            case "commit":
                conn.commit();
                conn.setAutoCommit(true);
                return null;
            case "rollback":
                conn.rollback();
                conn.setAutoCommit(true);
                return null;
            case "notifications": {
                String[] a = arg.split(" ");
                return notifications(conn, Integer.parseInt(a[0]), Integer.parseInt(a[1]));
            }
            default:
                throw new SQLException("unknown command " + op);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT")
                + "/" + System.getenv("PGDATABASE");
        Properties props = new Properties();
        props.setProperty("user", System.getenv("PGUSER"));
        props.setProperty("password", System.getenv("PGPASSWORD"));
        props.setProperty("connectTimeout", "20");   // seconds: the test must not hang
        props.setProperty("socketTimeout", "30");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try (Connection conn = DriverManager.getConnection(url, props)) {
            String line;
            while ((line = in.readLine()) != null && !line.equals("quit")) {
                String reply;
                try {
                    reply = "{\"value\": " + json(handle(conn, line)) + "}";
                } catch (SQLException e) {
                    reply = "{\"error\": " + json(e.getSQLState() + ": " + e.getMessage()) + "}";
                }
                System.out.println(reply);
                System.out.flush();
            }
        }
    }
}
