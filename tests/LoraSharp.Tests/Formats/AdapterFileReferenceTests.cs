using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Formats;

/// <summary>Every reference adapter (kohya, LyCORIS, diffusers, PEFT) loads onto its base with full coverage, and is written back as the original tools write it.</summary>
public class AdapterFileReferenceTests
{
    [Theory]
    [MemberData(nameof(FormatsFixtures.SdLoraCases), MemberType = typeof(FormatsFixtures))]
    public void Sd_reference_adapter_loads_every_key_onto_the_model(string name)
    {
        var manifest = FormatsFixtures.SdLora(name);
        using var result = AdapterFile.Read(FormatsFixtures.SdPath(manifest["file"]!.GetValue<string>()), FormatsFixtures.SdIndex);
        Assert.True(result.Coverage.IsComplete, result.Coverage.ToText());
        Assert.Equal(manifest["n_file_keys"]!.GetValue<int>(), result.Coverage.MatchedKeys);
        Assert.Equal(manifest["n_base_weights_changed"]!.GetValue<int>(), result.Weights.Modules.Count);
        Assert.Equal(BaseFamily.SD1, result.Base.Family);
        var expected = manifest["algorithm"]!.GetValue<string>() switch
        {
            "loha" => AdapterAlgorithm.LoHa,
            "lokr" => AdapterAlgorithm.LoKr,
            _ => AdapterAlgorithm.LoRA,
        };
        Assert.All(result.Weights.Modules, m => Assert.Equal(expected, m.Algorithm));
    }

    [Theory]
    [MemberData(nameof(FormatsFixtures.LlmAdapterCases), MemberType = typeof(FormatsFixtures))]
    public void Peft_reference_adapter_loads_every_key_with_its_config(string name)
    {
        var manifest = FormatsFixtures.LlmAdapter(name);
        var dir = FormatsFixtures.LlmPath(manifest["dir"]!.GetValue<string>());
        using var result = AdapterFile.Read(dir, FormatsFixtures.LlmIndex);
        Assert.True(result.Coverage.IsComplete, result.Coverage.ToText());
        Assert.NotNull(result.PeftConfig);
        Assert.Equal(BaseFamily.Llama, result.Base.Family);
        var config = result.PeftConfig!;
        if (config.PeftType != "LOKR") Assert.Equal(64, result.Base.HiddenSize);
        Assert.Equal(manifest["peft_type"]!.GetValue<string>(), config.PeftType);
        int layers = 2;
        Assert.Equal(layers * config.TargetModules.Count, result.Weights.Modules.Count);
        Assert.All(result.Weights.Modules, m =>
        {
            Assert.Equal(ScaleConvention.Peft, m.Convention);
            Assert.Equal(config.Alpha, m.Alpha);
            Assert.Equal(config.UseRslora, m.RsLora);
            Assert.Equal(config.UseDora, m.Has("magnitude"));
        });
    }

    [Theory]
    [InlineData("kohya_lora")]
    [InlineData("kohya_locon")]
    public void Kohya_file_written_by_us_has_the_tools_keys_shapes_dtypes_data_and_hash(string name)
    {
        var file = FormatsFixtures.SdPath(FormatsFixtures.SdLora(name)["file"]!.GetValue<string>());
        using var tmp = new TempDir();
        var output = tmp.File(name + ".safetensors");
        using (var result = AdapterFile.Read(file, FormatsFixtures.SdIndex))
            KohyaAdapterWriter.Write(output, result.Weights);

        using var original = SafetensorsFile.Open(file);
        using var ours = SafetensorsFile.Open(output);
        AssertSameTensors(original, ours);
        Assert.Equal(original.Metadata["sshs_model_hash"], ours.Metadata["sshs_model_hash"]);
        Assert.Equal(original.Metadata["sshs_legacy_hash"], ours.Metadata["sshs_legacy_hash"]);
        foreach (var key in new[] { "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture" })
            Assert.Equal(original.Metadata[key], ours.Metadata[key]);
        // The data section is byte-identical, so the whole file differs only in its header.
        Assert.Equal(AdapterHashes.DataSectionSha256(file), AdapterHashes.DataSectionSha256(output));
    }

    [Theory]
    [InlineData("lycoris_loha")]
    [InlineData("lycoris_lokr")]
    public void LyCORIS_file_written_by_us_has_the_tools_keys_shapes_dtypes_and_data(string name)
    {
        var file = FormatsFixtures.SdPath(FormatsFixtures.SdLora(name)["file"]!.GetValue<string>());
        using var tmp = new TempDir();
        var output = tmp.File(name + ".safetensors");
        using (var result = AdapterFile.Read(file, FormatsFixtures.SdIndex))
            KohyaAdapterWriter.Write(output, result.Weights);
        using var original = SafetensorsFile.Open(file);
        using var ours = SafetensorsFile.Open(output);
        AssertSameTensors(original, ours);
        Assert.Equal("lycoris.kohya", ours.Metadata["ss_network_module"]);
    }

    [Theory]
    [MemberData(nameof(FormatsFixtures.LlmAdapterCases), MemberType = typeof(FormatsFixtures))]
    public void Peft_folder_written_by_us_has_the_tools_keys_and_config(string name)
    {
        var dir = FormatsFixtures.LlmPath(FormatsFixtures.LlmAdapter(name)["dir"]!.GetValue<string>());
        using var tmp = new TempDir();
        var outDir = tmp.File(name);
        using (var result = AdapterFile.Read(dir, FormatsFixtures.LlmIndex))
            PeftAdapterWriter.WritePeftFolder(outDir, result.Weights);

        using (var original = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors")))
        using (var ours = SafetensorsFile.Open(Path.Combine(outDir, "adapter_model.safetensors")))
        {
            AssertSameTensors(original, ours);
            Assert.Equal(original.Metadata, ours.Metadata);
        }
        var a = PeftAdapterConfig.Read(Path.Combine(dir, "adapter_config.json"));
        var b = PeftAdapterConfig.Read(Path.Combine(outDir, "adapter_config.json"));
        Assert.Equal(a.PeftType, b.PeftType);
        Assert.Equal(a.R, b.R);
        Assert.Equal(a.Alpha, b.Alpha);
        Assert.Equal(a.UseRslora, b.UseRslora);
        Assert.Equal(a.UseDora, b.UseDora);
        Assert.Equal(a.TargetModules.Order(), b.TargetModules.Order());
        Assert.Empty(b.RankPattern);
        Assert.Empty(b.AlphaPattern);
        // Every field PEFT writes is present.
        var missing = a.Json.Select(p => p.Key).Where(k => !b.Json.ContainsKey(k)).ToList();
        Assert.True(missing.All(k => !EssentialPeftFields.Contains(k)), "missing: " + string.Join(", ", missing));
    }

    static readonly HashSet<string> EssentialPeftFields =
        ["peft_type", "r", "lora_alpha", "alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
         "fan_in_fan_out", "bias", "modules_to_save", "init_lora_weights", "init_weights", "lora_dropout", "task_type", "base_model_name_or_path"];

    [Fact]
    public void Diffusers_file_written_by_us_has_the_tools_keys_and_alpha_metadata()
    {
        var file = FormatsFixtures.SdPath(FormatsFixtures.SdLora("diffusers_lora")["file"]!.GetValue<string>());
        using var tmp = new TempDir();
        var output = tmp.File("out.safetensors");
        using (var result = AdapterFile.Read(file, FormatsFixtures.SdIndex))
            PeftAdapterWriter.WriteDiffusersFile(output, result.Weights);
        using var original = SafetensorsFile.Open(file);
        using var ours = SafetensorsFile.Open(output);
        AssertSameTensors(original, ours);
        using var back = AdapterFile.Read(output, FormatsFixtures.SdIndex);
        Assert.All(back.Weights.Modules, m => Assert.Equal(2.0, AdapterScales.Scale(m)));
    }

    [Fact]
    public void Mixed_diffusers_file_loads_both_key_formats_and_equals_the_uniform_file()
    {
        using var uniform = AdapterFile.Read(FormatsFixtures.SdPath("lora/diffusers_lora.safetensors"), FormatsFixtures.SdIndex);
        using var mixed = AdapterFile.Read(FormatsFixtures.SdPath("lora/diffusers_lora_mixed.safetensors"), FormatsFixtures.SdIndex);
        Assert.Contains(KeyFormat.DiffusersLegacy, mixed.KeyFormats);
        Assert.Contains(KeyFormat.DiffusersPeft, mixed.KeyFormats);
        Assert.Equal(uniform.Weights.Modules.Select(m => m.ModulePath), mixed.Weights.Modules.Select(m => m.ModulePath));
        foreach (var (u, m) in uniform.Weights.Modules.Zip(mixed.Weights.Modules))
        {
            Assert.True(BitEqual(u["lora_down"], m["lora_down"]), u.ModulePath);
            Assert.True(BitEqual(u["lora_up"], m["lora_up"]), u.ModulePath);
            Assert.Equal(AdapterScales.Scale(u), AdapterScales.Scale(m));
        }
    }

    /// <summary>Same dtype, shape and bytes.</summary>
    internal static bool BitEqual(Tensor a, Tensor b)
        => a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.contiguous().bytes.SequenceEqual(b.contiguous().bytes);

    internal static void AssertSameTensors(ITensorSource expected, ITensorSource actual)
    {
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), actual.Keys.Order(StringComparer.Ordinal));
        foreach (var key in expected.Keys)
        {
            var e = expected.Info(key);
            var a = actual.Info(key);
            Assert.True(e.DType == a.DType, $"{key}: dtype {a.DType}, expected {e.DType}");
            Assert.True(e.Shape.SequenceEqual(a.Shape), $"{key}: shape [{string.Join(",", a.Shape)}], expected [{string.Join(",", e.Shape)}]");
            using var te = expected.Load(key);
            using var ta = actual.Load(key);
            Assert.True(BitEqual(te, ta), $"{key}: values differ");
        }
    }
}
