using System.Buffers.Binary;
using System.Text;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using static LoraSharp.Tests.IO.SafetensorsRoundTripTests;

namespace LoraSharp.Tests.IO;

/// <summary>One corrupted file per validation rule: each must fail with a LoraSharpException naming the key and the problem.</summary>
public class CorruptSafetensorsTests
{
    sealed record Case(Func<byte[]> Bytes, string? Key, string Problem);

    static byte[] Json(string json, int dataBytes = 0) => HandBuilt(json, new byte[dataBytes]);

    static byte[] WithHeaderLength(ulong n, int total)
    {
        var b = new byte[total];
        BinaryPrimitives.WriteUInt64LittleEndian(b, n);
        if (total > 8) b[8] = (byte)'{';
        return b;
    }

    const string F32x2 = "\"dtype\":\"F32\",\"shape\":[2]";

    static readonly Dictionary<string, Case> Cases = new()
    {
        ["empty_file"] = new(() => [], null, "too short"),
        ["shorter_than_length_prefix"] = new(() => [1, 0, 0], null, "too short"),
        ["header_length_over_100MB"] = new(() => WithHeaderLength(200_000_000, 64), null, "over the 100 MB limit"),
        ["header_length_beyond_file"] = new(() => WithHeaderLength(1000, 64), null, "beyond the end of the file"),
        ["header_not_utf8"] = new(() =>
        {
            var b = Json("{\"a\xff\":{}}");
            b[11] = 0xFF; // inside the key string
            return b;
        }, null, "not valid UTF-8"),
        ["header_not_json"] = new(() => Json("{\"a\": {"), "a", "not valid JSON"),
        ["header_json_with_trailing_garbage"] = new(() => Json("{} xyz"), null, "not valid JSON"),
        ["header_not_an_object"] = new(() => Json("[1, 2]"), null, "not a JSON object"),
        ["entry_not_an_object"] = new(() => Json("{\"a\": 5}"), "a", "expected an object"),
        ["unknown_dtype"] = new(() => Json("{\"a\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1), "a", "unknown dtype 'F7'"),
        ["missing_data_offsets"] = new(() => Json("{\"a\":{" + F32x2 + "}}"), "a", "no 'data_offsets'"),
        ["missing_dtype"] = new(() => Json("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "a", "no 'dtype'"),
        ["shape_not_integers"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8), "a", "expected an integer"),
        ["negative_dimension"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8), "a", "negative dimension -2"),
        ["shape_vs_byte_size_mismatch"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8), "a", "needs 12 bytes but data_offsets [0, 8] hold 8"),
        ["offsets_reversed"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8), "a", "are invalid"),
        ["offsets_not_a_pair"] = new(() => Json("{\"a\":{" + F32x2 + ",\"data_offsets\":[0,4,8]}}", 8), "a", "expected [begin, end]"),
        ["offsets_beyond_data"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}", 8), "a", "beyond the data section"),
        ["overlapping_regions"] = new(() => Json("{\"a\":{" + F32x2 + ",\"data_offsets\":[0,8]},\"b\":{" + F32x2 + ",\"data_offsets\":[4,12]}}", 12), "b", "overlap the data of 'a'"),
        ["gap_between_regions"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12), "b", "gap of 4 bytes"),
        ["gap_before_first_region"] = new(() => Json("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8), "a", "gap of 4 bytes"),
        ["trailing_unexplained_bytes"] = new(() => Json("{\"a\":{" + F32x2 + ",\"data_offsets\":[0,8]}}", 20), null, "12 unexplained trailing bytes"),
        ["duplicate_tensor_key"] = new(() => Json("{\"a\":{" + F32x2 + ",\"data_offsets\":[0,8]},\"a\":{" + F32x2 + ",\"data_offsets\":[8,16]}}", 16), "a", "duplicate tensor key"),
        ["duplicate_field_in_entry"] = new(() => Json("{\"a\":{" + F32x2 + ",\"dtype\":\"F16\",\"data_offsets\":[0,8]}}", 8), "a", "duplicate field 'dtype'"),
        ["duplicate_metadata_key"] = new(() => Json("{\"__metadata__\":{\"x\":\"1\",\"x\":\"2\"}}"), "__metadata__.x", "duplicate metadata key"),
        ["duplicate_metadata_object"] = new(() => Json("{\"__metadata__\":{},\"__metadata__\":{}}"), "__metadata__", "duplicate key '__metadata__'"),
        ["metadata_value_not_a_string"] = new(() => Json("{\"__metadata__\":{\"epochs\":10}}"), "__metadata__.epochs", "metadata value is a number, expected a string"),
        ["metadata_not_an_object"] = new(() => Json("{\"__metadata__\":[\"x\"]}"), "__metadata__", "expected an object of strings"),
        ["truncated_file"] = new(() =>
        {
            var b = Json("{\"a\":{" + F32x2 + ",\"data_offsets\":[0,8]},\"b\":{" + F32x2 + ",\"data_offsets\":[8,16]}}", 16);
            return b[..^5];
        }, "b", "truncated file"),
    };

    public static TheoryData<string> CaseNames() => new(Cases.Keys.Order(StringComparer.Ordinal));

    [Theory]
    [MemberData(nameof(CaseNames))]
    public void Corrupted_file_is_refused_naming_file_key_and_problem(string caseName)
    {
        var c = Cases[caseName];
        using var dir = new TempDir();
        var path = dir.File(caseName + ".safetensors");
        File.WriteAllBytes(path, c.Bytes());
        var e = Assert.Throws<LoraSharpException>(() => SafetensorsFile.Open(path).Dispose());
        Assert.Equal(path, e.FilePath);
        Assert.Equal(c.Key, e.Key);
        Assert.Contains(c.Problem, e.Message);
        Assert.StartsWith(path + ": ", e.Message);
    }

    [Fact]
    public void Magic_byte_dispatch_refuses_unknown_and_legacy_formats_clearly()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir.File("junk.bin"), Encoding.ASCII.GetBytes("hello world, not a tensor file"));
        var e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("junk.bin")));
        Assert.Contains("unknown file format", e.Message);

        // torch < 1.6 wrote a bare pickle stream (protocol 2) starting with the magic number.
        File.WriteAllBytes(dir.File("old.pt"), [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e]);
        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("old.pt")));
        Assert.Contains("legacy", e.Message);
        Assert.Contains("torch>=1.6", e.Message);

        e = Assert.Throws<LoraSharpException>(() => TensorFiles.Open(dir.File("missing.safetensors")));
        Assert.Contains("file not found", e.Message);
    }
}
