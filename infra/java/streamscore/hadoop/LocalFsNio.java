package streamscore.hadoop;

import java.io.IOException;
import java.net.URI;
import java.net.URISyntaxException;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.ChecksumFs;
import org.apache.hadoop.fs.DelegateToFileSystem;
import org.apache.hadoop.fs.FsConstants;
import org.apache.hadoop.fs.FsServerDefaults;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.local.LocalConfigKeys;

/**
 * The same for Hadoop's {@code FileContext} API ({@code fs.AbstractFileSystem.file.impl}), which
 * Spark's streaming checkpoint and Delta's log store write through: Hadoop's {@code LocalFs} over
 * {@link LocalFileSystemNio.Raw}.
 */
public class LocalFsNio extends ChecksumFs {
  public LocalFsNio(URI uri, Configuration conf) throws IOException, URISyntaxException {
    super(new RawFs(conf));
  }

  public LocalFsNio(Configuration conf) throws IOException, URISyntaxException {
    super(new RawFs(conf));
  }

  /** Hadoop's {@code RawLocalFs} with the raw file system above. */
  public static class RawFs extends DelegateToFileSystem {
    public RawFs(Configuration conf) throws IOException, URISyntaxException {
      super(FsConstants.LOCAL_FS_URI, new LocalFileSystemNio.Raw(), conf, FsConstants.LOCAL_FS_URI.getScheme(), false);
    }

    @Override
    public int getUriDefaultPort() {
      return -1;
    }

    @Override
    @Deprecated
    public FsServerDefaults getServerDefaults() throws IOException {
      return LocalConfigKeys.getServerDefaults();
    }

    @Override
    public FsServerDefaults getServerDefaults(Path f) throws IOException {
      return LocalConfigKeys.getServerDefaults();
    }

    @Override
    public boolean isValidName(String src) {
      return true; // as RawLocalFs: local names need no checks
    }
  }
}
